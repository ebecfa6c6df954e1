"""bertjax: pretrain, fine-tune and study BERT-style encoders in JAX/Flax."""

__version__ = "0.1.0"
