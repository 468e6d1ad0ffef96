"""Model builders and loaders: offline tokenizer, tiny models from config, the digits model,
Stable Diffusion pipelines."""
