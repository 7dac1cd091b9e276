"""Every file name and key prefix zero2merged reads or writes, in one place."""

# In the checkpoint (DeepSpeed's and PEFT's names).
LATEST = "latest"  # holds the tag of the newest save, e.g. "global_step500"
MODEL_STATES_GLOB = "*_model_states.pt"  # ZeRO-1/2: one file; ZeRO-3: one per rank
OPTIM_STATES_GLOB = "*_optim_states.pt"  # one per rank; "bf16_" prefix for bf16 runs
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's LoraConfig, written by the Trainer / save_pretrained
PEFT_PREFIX = "base_model.model."  # PeftModel state-dict keys start with this

# In the work directory.
MANIFEST = "manifest.json"  # stage records: fingerprints, outputs with sha256, metrics, timings
LOCK = "lock"  # held (flock) by the run using the work directory
INSPECT = "inspect.json"  # stage 1: what the checkpoint holds
CONSOLIDATED = "consolidated.safetensors"  # stage 2: every saved param, trainable ones in fp32
REBUILD = "rebuild.json"  # stage 3: the model class and LoRA config the wrapper was built from
LOAD = "load.json"  # stage 4: where every key came from
MERGED = "merged"  # stage 5: the merged model in fp32 (save_pretrained layout)
PROBES = "probes.safetensors"  # stage 5: probe inputs and the unmerged / merged outputs on them

# Beside the output: the model is written here, verified, then renamed into place.
PARTIAL_SUFFIX = ".zero2merged-partial"
PARTIAL_MARKER = ".zero2merged-partial"  # inside a partial folder: says it is ours to delete
WORK_SUFFIX = ".zero2merged-work"  # default work directory: <output>.zero2merged-work
