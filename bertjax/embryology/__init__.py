"""Embryology (Chiang, Huang & Lee, 2020): what a model knows at each kept checkpoint of its pretraining.

The measures, each a function of one checkpoint:
  features   Model: a checkpoint (or the step-0 initialisation) with its tokenizer and jitted, batched
             forward passes that reduce per batch (MLM argmax ids, hidden states at chosen positions)
  pos        measure 1: token reconstruction and masked-word prediction accuracy by UPOS tag
  probes     measure 2: layer-wise softmax probes on frozen features, with Hewitt & Liang control tasks
  cka        measure 3: linear CKA between layers' representations of a fixed token sample
The study around them (which checkpoints, caching, tables, plots) is `study`.
"""
