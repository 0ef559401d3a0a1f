"""The config wing: the recipe schema and overrides (recipe), the model's shape (model_shape), the batch plan
(batch_plan), the LR schedule's length (schedule), the DeepSpeed config fill (ds_config, templates in
coconut_scale/ds_configs/) and the memory estimate (memory). Everything here runs without a GPU or a process
group; only model_shape's last resort (AutoConfig for a model the shapes table does not know) may download."""
