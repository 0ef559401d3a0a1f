"""The config wing: the recipe schema and overrides, the batch plan, the DeepSpeed config fill and the memory
estimate. Everything here runs without a GPU, a model or a process group."""
