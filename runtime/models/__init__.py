"""Layer 1, the models: loaded components, the model families that know their graphs, and the sources they
come from (embedded models, presets, diffusers folders, deployed exports), with the adapters that change
their weights (LoRA, textual inversion) and ControlNets. Below the backends and the pipeline."""
