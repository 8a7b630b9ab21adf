"""alignscope: what did preference alignment do to a model's biases and trustworthiness, and
which training examples did it?"""

__version__ = "0.1.0"
