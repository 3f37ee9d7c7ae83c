"""Run by tests/test_model_use.py in a fresh process outside the repository: a checkpoint used the way a Hub user
uses it (trust_remote_code=True, HF_HUB_OFFLINE=1), every class coming from the checkpoint's own files. It measures
and writes the numbers to a JSON file; the test asserts on them.

    python checkpoint_use.py CKPT PROTEINS_JSON WORK_DIR OUT_JSON
"""

import json
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

warnings.simplefilter("ignore")
ckpt, proteins, work, out_path = sys.argv[1], json.loads(Path(sys.argv[2]).read_text()), sys.argv[3], sys.argv[4]
result = {"modules": {}}
tokenizer = AutoTokenizer.from_pretrained(ckpt, trust_remote_code=True)
batch = tokenizer(proteins, padding=True, return_tensors="pt")
mlm = AutoModelForMaskedLM.from_pretrained(ckpt, trust_remote_code=True).eval()
result["modules"]["mlm"] = type(mlm).__module__
result["modules"]["tokenizer"] = type(tokenizer).__module__


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


with torch.no_grad():
    reference = mlm(**batch).logits  # (B, L, V)

# 1. re-save of a loaded checkpoint, then load again (the auto_map must survive)
mlm.save_pretrained(f"{work}/resaved")
tokenizer.save_pretrained(f"{work}/resaved")
again = AutoModelForMaskedLM.from_pretrained(f"{work}/resaved", trust_remote_code=True).eval()
with torch.no_grad():
    result["resave_logits_diff"] = max_diff(again(**batch).logits, reference)
result["resave_auto_map"] = json.loads(Path(f"{work}/resaved/config.json").read_text())["auto_map"]

# 2. return_dict=False: tuples, same tensors
with torch.no_grad():
    as_tuple = mlm(**batch, return_dict=False)
    base_tuple = AutoModel.from_pretrained(ckpt, trust_remote_code=True).eval()(**batch, return_dict=False)
result["tuple_types"] = [type(as_tuple).__name__, type(base_tuple).__name__]
result["tuple_logits_diff"] = max_diff(as_tuple[0], reference)

# 3. hidden_states[-1] == last_hidden_state (ESM's convention), one per block + the embedding output
base = AutoModel.from_pretrained(ckpt, trust_remote_code=True).eval()
with torch.no_grad():
    out = base(**batch, output_hidden_states=True)
result["n_hidden_states"] = len(out.hidden_states)
result["last_hidden_diff"] = max_diff(out.hidden_states[-1], out.last_hidden_state)

# 4. attentions: eager probabilities; sdpa falls back to eager for that call
real, padding = batch["attention_mask"] == 1, batch["attention_mask"] == 0
real_to_padding = real[:, None, :, None] & padding[:, None, None, :]  # (B, 1, L, L)
for implementation in ("eager", "sdpa"):
    model = AutoModelForMaskedLM.from_pretrained(ckpt, trust_remote_code=True, attn_implementation=implementation)
    with torch.no_grad():
        attentions = model.eval()(**batch, output_attentions=True).attentions
    rows = torch.stack(attentions).sum(-1)  # (layers, B, H, L): every row sums to 1, padding rows included
    result[f"attentions_{implementation}"] = {
        "count": len(attentions),
        "shape": list(attentions[0].shape),
        "row_sum_error": (rows - 1).abs().max().item(),
        # a real token never attends to padding: probability mass of (real query, padding key) pairs
        "mass_on_padding": max(a[real_to_padding.expand_as(a)].sum().item() for a in attentions),
    }

# 5. set_attn_implementation switches the backend: count SDPA calls
calls = []
sdpa = F.scaled_dot_product_attention


def counting_sdpa(*args, **kwargs):
    calls.append(1)
    return sdpa(*args, **kwargs)


F.scaled_dot_product_attention = counting_sdpa
counts = {}
for implementation in ("eager", "sdpa"):
    mlm.set_attn_implementation(implementation)
    before = len(calls)
    with torch.no_grad():
        logits = mlm(**batch).logits
    counts[implementation] = [len(calls) - before, max_diff(logits, reference)]
F.scaled_dot_product_attention = sdpa
result["sdpa_calls"] = counts

# 6. inputs_embeds == input_ids (input_ids still feed the value-embedding tables), and the error without them
with torch.no_grad():
    embeds = mlm.get_input_embeddings()(batch["input_ids"])
    from_embeds = mlm(input_ids=batch["input_ids"], inputs_embeds=embeds, attention_mask=batch["attention_mask"])
result["inputs_embeds_diff"] = max_diff(from_embeds.logits, reference)
try:
    mlm(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
    result["inputs_embeds_alone"] = "no error"
except ValueError as err:
    result["inputs_embeds_alone"] = str(err)

# 7. gradient checkpointing: the same gradients
labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)


def gradients(model):
    model.zero_grad()
    model.train()(**batch, labels=labels).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


plain = gradients(mlm)
mlm.gradient_checkpointing_enable()
checkpointed = gradients(mlm)
result["checkpointing_flags"] = [block.gradient_checkpointing for block in mlm.model.layers]
result["checkpointing_grad_diff"] = max(max_diff(plain[n], checkpointed[n]) for n in plain)
result["checkpointing_zero_grads"] = sum(int(g.abs().sum() == 0) for g in checkpointed.values())
mlm.gradient_checkpointing_disable()
mlm.eval()

# 8. train mode with labels keeps the (B, L, V) contract
with torch.no_grad():
    result["train_logits_shape"] = list(mlm.train()(**batch, labels=labels).logits.shape)
mlm.eval()

# 9. torch.compile(fullgraph=True): no graph break anywhere in the forward
compiled = torch.compile(mlm, fullgraph=True, backend="aot_eager")
with torch.no_grad():
    result["compile_diff"] = max_diff(compiled(**batch).logits, reference)

# 10. export: transformers' DynamoExporter (torch.export, the first stage of its ONNX exporter), dynamic shapes
from transformers.exporters.configs import DynamoConfig  # noqa: E402
from transformers.exporters.exporter_dynamo import DynamoExporter  # noqa: E402

exported = DynamoExporter().export(mlm, dict(batch), config=DynamoConfig(dynamic=True))
other = tokenizer(proteins[:2], padding=True, return_tensors="pt")  # another batch and length
with torch.no_grad():
    result["export_diff"] = max_diff(exported(**other).logits, mlm(**other).logits)
result["export_graph_has_cummax"] = "cummax" in str(exported.program.graph)

# 11. resize_token_embeddings: new ids work, value-embedding tables follow
mlm.resize_token_embeddings(40)
ids = batch["input_ids"].clone()
ids[:, 1] = 38
with torch.no_grad():
    result["resized_logits_shape"] = list(mlm(ids, attention_mask=batch["attention_mask"]).logits.shape)
result["resized_tables"] = [t.num_embeddings for t in mlm.model.value_embeds] + [mlm.config.vocab_size]

# 12. tokenizer: prepare's policy
result["tokenizer"] = {
    "lower_equals_upper": tokenizer("mqifvktltgk")["input_ids"] == tokenizer("MQIFVKTLTGK")["input_ids"],
    "stop_stripped": tokenizer("MQIFVK*")["input_ids"] == tokenizer("MQIFVK")["input_ids"],
    "mask_id": tokenizer("MQ<mask>FV")["input_ids"][3] == tokenizer.mask_token_id,
    "errors": {},
}
for text in ("MKTJ12AYI", "MKT2AYI", "MKT AYI", "MK-TAYI", "MK*TAYI"):
    try:
        tokenizer(text)
        result["tokenizer"]["errors"][text] = None
    except ValueError as err:
        result["tokenizer"]["errors"][text] = str(err)
too_long = "M" * (tokenizer.model_max_length + 10)
try:
    tokenizer(too_long)
    result["tokenizer"]["too_long"] = None
except ValueError as err:
    result["tokenizer"]["too_long"] = str(err)
result["tokenizer"]["cropped_length"] = len(tokenizer(too_long, truncation=True)["input_ids"])
result["tokenizer"]["model_max_length"] = tokenizer.model_max_length

with open(out_path, "w") as f:
    json.dump(result, f, indent=1)
