"""mlx-provider: a provider agent for a compute marketplace, serving chat
completions with local MLX inference."""

__version__ = "0.1.0"
