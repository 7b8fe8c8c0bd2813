"""Serve and train many PEFT LoRA adapters behind one Hugging Face causal LM, one adapter per sequence.

    mm = MultiLoRAModel(model, max_loras=8, max_rank=16, max_cpu_loras=32)  # swaps the targeted nn.Linear layers
    mm.load_adapter("sql", "path/to/peft_adapter_dir")          # adapter_config.json + adapter_model.*: a slot now
    for name, path in many_adapters.items():
        mm.register_adapter(name, path)                         # config checked; weights read when first used
    out = mm(input_ids, attention_mask=mask, adapter_names=["sql", None, "chat"])
    mm.generate(input_ids, attention_mask=mask, adapter_names=[...], max_new_tokens=16)
    mm.stats()                                                  # {"hits": ..., "host_hits": ..., "disk_reads": ...}

Training several adapters in one batch (one concept with serving: an adapter lives in a slot either way):

    mm.add_adapter("de", LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))  # or a dict
    mm.add_adapter("fr", {...});  mm.train()
    opt = torch.optim.AdamW(mm.param_groups(), lr=1e-4)        # or parameters_of("de") for one adapter
    out = mm(input_ids, labels=labels, adapter_names=["de", "fr", "de", ...])
    out.loss.backward(); opt.step(); opt.zero_grad()            # set_to_none (the default) matters, see model.py
    mm.eval(); mm.save_adapter("de", "out/de")                  # a PEFT adapter directory

Three parts, one concern each:

* `adapter_files`: the PEFT adapter directory format -- reading untrusted files into validated host tensors,
  config checks, the regex guard, the LoRA scaling rule, the atomic writer. Knows nothing of models.
* `adapter_store`: the slot cache -- device slots, LRU eviction, pins, registrations, the host tier
  (``max_cpu_loras``) and the counters of `MultiLoRAModel.stats()`. Plain Python.
* `model`: `MultiLoRAModel`, which wires both to the MultiLoRALinear layers and runs forwards (threads, the
  per-step batch, training).
"""
from lora_kernels.serving.adapter_files import (BIN_NAME, CONFIG_NAME, PATTERN_BUDGET_S, SAFETENSORS_NAME,
                                                AdapterError, AdapterWeights, _pattern_value, _unsafe_pattern,
                                                _write_file, read_adapter, write_adapter, write_dir_atomically)
from lora_kernels.serving.adapter_store import AdapterStore
from lora_kernels.serving.model import IGNORE_INDEX, MultiLoRAModel, per_adapter_loss

__all__ = ["AdapterError", "AdapterStore", "AdapterWeights", "BIN_NAME", "CONFIG_NAME", "IGNORE_INDEX",
           "MultiLoRAModel", "PATTERN_BUDGET_S", "SAFETENSORS_NAME", "per_adapter_loss", "read_adapter",
           "write_adapter", "write_dir_atomically"]
