"""Model loading: checkpoints in every supported layout and GGUF, named models and their fetching, random weights."""
