"""repfuse: turn training-time re-parameterized CNN checkpoints into verified deploy-mode files."""
__version__ = "0.1.0"
