"""Every file name and key prefix zero2merged reads or writes, in one place."""

# In the checkpoint (DeepSpeed's and PEFT's names).
LATEST = "latest"  # holds the tag of the newest save, e.g. "global_step500"
MODEL_STATES_GLOB = "*_model_states.pt"  # ZeRO-1/2: one file; ZeRO-3: one per rank
OPTIM_STATES_GLOB = "*_optim_states.pt"  # one per rank; "bf16_" prefix for bf16 runs
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's LoraConfig, written by the Trainer / save_pretrained
PEFT_PREFIX = "base_model.model."  # PeftModel state-dict keys start with this

# Inside the rank files: DeepSpeed's keys (deepspeed/checkpoint/constants.py; the last four are literals in
# its engine), restated here so reading a checkpoint never imports deepspeed (seconds of start-up); a test
# holds them equal to DeepSpeed's constants.
OPTIMIZER_STATE_DICT = "optimizer_state_dict"
ZERO_STAGE = "zero_stage"
PARTITION_COUNT = "partition_count"
FP32_FLAT_GROUPS = "fp32_flat_groups"  # ZeRO-3 masters
SINGLE_PARTITION_OF_FP32_GROUPS = "single_partition_of_fp32_groups"  # ZeRO-1/2 masters
BASE_OPTIMIZER_STATE = "base_optimizer_state"  # ZeRO-1/2: the wrapped optimizer's (Adam's) own state
PARAM_ALIGNMENT_PADDINGS = "param_alignment_paddings"
PARAM_SHAPES = "param_shapes"
BUFFER_NAMES = "buffer_names"
FROZEN_PARAM_SHAPES = "frozen_param_shapes"
FROZEN_PARAM_FRAGMENTS = "frozen_param_fragments"
DS_VERSION = "ds_version"
MODULE = "module"  # the model-state file's module state dict (16-bit; empty tensors under ZeRO-3)
SHARED_PARAMS = "shared_params"
OPTIMIZER = "optimizer"  # ZeRO stage 0: the model-state file holds the optimizer's state itself
FP32_GROUPS_FLAT = "fp32_groups_flat"  # ... and a 16-bit run's fp32 masters, one flat tensor per param group
FP32_GROUPS = "fp32_groups"  # ... or (a raw engine, a torch optimizer) one fp32 tensor per param, per group
DP_WORLD_SIZE = "dp_world_size"
GLOBAL_STEPS = "global_steps"
DS_CONFIG = "ds_config"

# In the work directory.
MANIFEST = "manifest.json"  # stage records: fingerprints, typed results, outputs with sha256, timings
LOCK = "lock"  # held (flock) by the run using the work directory
CONSOLIDATED = "consolidated.safetensors"  # stage 2: every saved param (trainable in fp32, frozen by reference)
DEQUANTIZED = (
    "#dequantized"  # a source: stage 2's store, its 4-bit weights read dequantized (zero2merged.checkpoint.quantized)
)
ORIGINAL = "#original"  # a source: the base's folder, its weights as stored (not made 4-bit, for a QLoRA run)
MERGED = "merged"  # stage 5: the output's files (streaming), or the merged model in fp32 (in memory)
PROBES = "probes.safetensors"  # stage 5: probe inputs and the unmerged / merged outputs on them
REPORT = "report.json"  # the last run's report: every stage, ran or skipped, times, metrics

# In the output: transformers' names (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME).
WEIGHTS = "model.safetensors"
WEIGHTS_PATTERN = "model{suffix}.safetensors"  # how save_pretrained names shards
WEIGHTS_INDEX = "model.safetensors.index.json"
MODEL_CARD = "README.md"  # provenance and checks, beside the weights (the Hub shows it)

# Beside the output: the model is written here, verified, then renamed into place.
PARTIAL_SUFFIX = ".zero2merged-partial"
PARTIAL_MARKER = ".zero2merged-partial"  # inside a partial folder: says it is ours to delete
WORK_SUFFIX = ".zero2merged-work"  # default work directory: <output>.zero2merged-work
