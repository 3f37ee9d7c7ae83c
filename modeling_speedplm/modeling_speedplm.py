"""SpeedPLM: an ESM2-style masked-LM encoder in the modded-nanogpt lineage, and its task heads.

Per block (pre-norm, parameter-free RMSNorm):  x = a*x + b*x0 ;  x += Attn(norm(x)) ;  x += MLP(norm(x))
  Attn: fused qkv -> QK-norm -> rotary (positions restart per protein) -> value-embedding mix -> attention over the
        protein's own tokens only -> zero-initialised output projection.
  MLP:  up -> ReLU^2 -> zero-initialised down projection.
Around the blocks: U-Net skips from block i to block L-1-i, value-embedding tables shared by block j and L-1-j, a
final RMSNorm, and a tanh soft-capped LM head. Each choice is a config switch. Shapes: B batch, L tokens per row,
H heads, D head dim, P proteins.

Two input forms give identical results: padded rows (`attention_mask`) and packed rows (`document_ids`, -1 on padding,
with `position_ids` restarting per protein; both are derived if omitted).

Built like transformers' own encoders (ESM, ModernBERT): blocks are GradientCheckpointingLayers; hidden states and
attention probabilities are recorded by `capture_outputs` hooks (hidden_states[-1] is last_hidden_state); heads
honour `return_dict=False`; the attention backend is dispatched from the config inside the attention module; the
kernel set is resolved once, when the model is built (kernels_speedplm.select_kernels).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    MaskedLMOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from transformers.utils import can_return_tuple, logging
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .attention_speedplm import (
    ALL_ATTENTION_FUNCTIONS,
    attention_backend,
    build_attention_mask,
    eager_attention_forward,
)
from .configuration_speedplm import SpeedPLMConfig
from .fp8_speedplm import fp8_linear
from .kernels_speedplm import Kernels, apply_rotary, select_kernels

logger = logging.get_logger(__name__)


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    # Parameter-free (modded-nanogpt): gains would be redundant with the learned scalars and the next projection.
    return F.rms_norm(x, (x.size(-1),), eps=eps)


def document_ids_from(tokens: torch.Tensor, attention_mask, document_ids) -> torch.Tensor:
    """(B, L) document id per token, -1 on padding; `tokens` is (B, L) ids or (B, L, hidden) embeddings."""
    if document_ids is None:
        document_ids = torch.zeros(tokens.shape[:2], dtype=torch.int32, device=tokens.device)
    if attention_mask is not None:
        document_ids = document_ids.masked_fill(attention_mask == 0, -1)
    return document_ids


def positions_from(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) position of each token inside its own document: 0 at every document start.

    Export-friendly (torch.export, ONNX): the start of each run of equal ids comes from a scatter-min over run indices
    and a gather, not from cummax (which exporters do not lower)."""
    batch, length = document_ids.shape
    idx = torch.arange(length, device=document_ids.device).expand(batch, length)  # (B, L)
    first = torch.ones_like(document_ids[:, :1], dtype=torch.bool)
    starts = torch.cat([first, document_ids[:, 1:] != document_ids[:, :-1]], dim=1)  # (B, L)
    run = starts.long().cumsum(1) - 1  # (B, L) index of the run a token belongs to
    run_start = torch.full_like(idx, length).scatter_reduce(1, run, idx, reduce="amin")  # (B, L) first index per run
    return idx - run_start.gather(1, run)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, position_ids: torch.Tensor):
        # Frequencies are recomputed per forward (D/2 numbers) instead of kept in a non-persistent buffer, which
        # from_pretrained would materialise uninitialised from the meta device.
        exponents = torch.arange(0, self.head_dim, 2, device=position_ids.device, dtype=torch.float32) / self.head_dim
        inv_freq = 1.0 / (self.theta**exponents)
        freqs = position_ids[..., None].float() * inv_freq  # (B, L, D/2)
        return freqs.cos(), freqs.sin()


class SpeedPLMAttention(nn.Module):
    def __init__(self, config: SpeedPLMConfig, has_value_embedding: bool, kernels: Kernels):
        super().__init__()
        self.config, self.kernels = config, kernels
        self.is_causal = False  # a bidirectional encoder (read by transformers' sdpa backend)
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.qk_norm, self.eps = config.qk_norm, config.rms_norm_eps
        self.scaling = self.head_dim**-0.5
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.o_proj.zero_init = True  # each block starts as the identity (modded-nanogpt)
        # v = a*v + b*ve: the learned mix lets each block choose how much raw token identity enters its values.
        self.value_mix = nn.Parameter(torch.tensor([0.5, 0.5])) if has_value_embedding else None

    def forward(self, x, value_embedding, cos, sin, attention_mask, **kwargs):
        """x (B, L, hidden) -> (B, L, hidden), attention probabilities (B, H, L, L) on the eager backend else None."""
        batch, length, _ = x.shape
        qkv = self.qkv_proj(x)  # under autocast: the autocast dtype
        q, k, v = qkv.view(batch, length, 3, self.num_heads, self.head_dim).unbind(2)  # (B, L, H, D)
        if self.qk_norm:  # bounds attention logits, which lets Muon use larger learning rates
            q, k = self.kernels.qk_norm_rotary(q, k, cos, sin, self.eps)  # fused RMSNorm + rotary
        else:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.value_mix is not None:
            v = self.value_mix[0] * v + self.value_mix[1] * value_embedding.view_as(v)
        # One dtype into the backend, the projection's: under bf16 autocast the torch twin's RMSNorm and the fp32
        # rotary tables make q, k fp32 and the fp32 value-embedding table makes v fp32. Backends differ on mixed
        # inputs (flex may raise or silently run in fp32, sdpa raises); a no-op when they already agree.
        q, k, v = (t.to(qkv.dtype).transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
        backend = attention_backend(self.config._attn_implementation, x.device, kwargs.get("output_attentions", False))
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(backend, eager_attention_forward)
        out, probs = attention_interface(self, q, k, v, attention_mask, scaling=self.scaling, dropout=0.0, **kwargs)
        return self.o_proj(out.reshape(batch, length, -1)), probs


class SpeedPLMMLP(nn.Module):
    def __init__(self, config: SpeedPLMConfig, kernels: Kernels):
        super().__init__()
        self.kernels = kernels
        self.fp8 = config.fp8 == "mlp"
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.down_proj.zero_init = True

    def _plain_linears(self) -> bool:
        return isinstance(self.up_proj, nn.Linear) and isinstance(self.down_proj, nn.Linear)

    def forward(self, x):
        # ReLU^2 (So et al. 2021, Primer; used by modded-nanogpt): as good as GELU-gated MLPs with two matrices.
        # config.fp8="mlp", training only (checked first: off costs one attribute read); a wrapped projection (PEFT,
        # quantized) runs as a module below
        if self.fp8 and self.training and torch.is_grad_enabled() and self._plain_linears():
            return fp8_linear(F.relu(fp8_linear(x, self.up_proj.weight)).square(), self.down_proj.weight)
        if isinstance(self.up_proj, nn.Linear):
            return self.down_proj(self.kernels.linear_relu2(x, self.up_proj.weight))  # fused up-projection + ReLU^2
        # A wrapped projection (a PEFT LoRA layer, a quantized linear) must run as a module, or it would be bypassed.
        return self.down_proj(F.relu(self.up_proj(x)).square())


class SpeedPLMBlock(GradientCheckpointingLayer):
    def __init__(self, config: SpeedPLMConfig, has_value_embedding: bool, kernels: Kernels):
        super().__init__()
        self.eps = config.rms_norm_eps
        self.attn = SpeedPLMAttention(config, has_value_embedding, kernels)
        self.mlp = SpeedPLMMLP(config, kernels)
        # x = a*x + b*x0 (modded-nanogpt): every block can re-read the token embedding; starts at a=1, b=0.
        self.x0_mix = nn.Parameter(torch.tensor([1.0, 0.0])) if config.x0_mixing else None

    def forward(self, x, x0, value_embedding, cos, sin, attention_mask, **kwargs):
        # Tensors positional: transformers' (reentrant) activation checkpointing only tracks positional inputs.
        if self.x0_mix is not None:
            x = self.x0_mix[0] * x + self.x0_mix[1] * x0
        attended, _ = self.attn(rms_norm(x, self.eps), value_embedding, cos, sin, attention_mask, **kwargs)
        x = x + attended
        return x + self.mlp(rms_norm(x, self.eps))


class SpeedPLMPreTrainedModel(PreTrainedModel):
    config_class = SpeedPLMConfig
    config: SpeedPLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    accepts_loss_kwargs = False  # losses are means over their batch: Trainer averages over accumulation itself
    _no_split_modules = ["SpeedPLMBlock"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_record_outputs = {
        "hidden_states": SpeedPLMBlock,  # the embedding output, then every block's output
        "attentions": OutputRecorder(SpeedPLMAttention, index=1),
    }

    def __init__(self, config: SpeedPLMConfig, *inputs, **kwargs):
        super().__init__(config, *inputs, **kwargs)
        # save_pretrained writes the auto_map entry of the class being saved only; every class of this file goes
        # into the config, so any save (in-repo, or of a class loaded from a checkpoint) lists them all.
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **auto_map()}

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "zero_init", False):
                init.zeros_(module.weight)
            else:
                init.normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, std=std)
        elif isinstance(module, SpeedPLMAttention) and module.value_mix is not None:
            init.constant_(module.value_mix, 0.5)
        elif isinstance(module, SpeedPLMBlock) and module.x0_mix is not None:
            if not getattr(module.x0_mix, "_is_hf_initialized", False):
                module.x0_mix.copy_(torch.tensor([1.0, 0.0]))
        elif isinstance(module, SpeedPLMModel) and module.skip_weights is not None:
            init.ones_(module.skip_weights)

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        """transformers' resize of the token table (and LM head), plus the value-embedding tables, which are indexed
        by the same token ids."""
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        tables = self.base_model.value_embeds
        for j, table in enumerate(tables):
            if table.num_embeddings != embeddings.num_embeddings:
                tables[j] = self._get_resized_embeddings(table, embeddings.num_embeddings, mean_resizing=mean_resizing)
        return embeddings


class SpeedPLMModel(SpeedPLMPreTrainedModel):
    def __init__(self, config: SpeedPLMConfig):
        super().__init__(config)
        n_layers, n_tables = config.num_hidden_layers, config.value_embeddings
        # One kernel choice, resolved here and kept: "auto" decides per tensor device (kernels_speedplm.triton_auto).
        self.kernels = select_kernels(config.kernels)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        # Value embeddings (modded-nanogpt, @Grad62304977): table j feeds the values of block j and of its U-Net
        # mirror L-1-j, the blocks closest to the input and to the output, where token identity helps most; extra
        # parameters but no extra matrix products.
        self.value_embeds = nn.ModuleList(nn.Embedding(config.vocab_size, config.hidden_size) for _ in range(n_tables))
        self.value_table_of_layer = [None] * n_layers
        for j in range(n_tables):
            self.value_table_of_layer[j] = self.value_table_of_layer[n_layers - 1 - j] = j
        self.layers = nn.ModuleList(
            SpeedPLMBlock(config, self.value_table_of_layer[i] is not None, self.kernels) for i in range(n_layers)
        )
        # U-Net (SpeedrunningPLMs / modded-nanogpt): block L/2+i receives block L/2-1-i's output, learned weight.
        self.skip_weights = nn.Parameter(torch.ones(n_layers // 2)) if config.unet else None
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.post_init()

    @capture_outputs
    def forward(
        self,
        input_ids: torch.Tensor | None = None,  # (B, L)
        attention_mask: torch.Tensor | None = None,  # (B, L), 1 = token, 0 = padding
        document_ids: torch.Tensor | None = None,  # (B, L), protein index within the row, -1 = padding
        position_ids: torch.Tensor | None = None,  # (B, L), restart at 0 per protein
        inputs_embeds: torch.Tensor | None = None,  # (B, L, hidden), replaces the token-embedding lookup
        **kwargs,  # output_hidden_states, output_attentions, return_dict
    ) -> BaseModelOutput:
        """`inputs_embeds` replaces `embed_tokens(input_ids)`; the value-embedding tables are indexed by token id,
        so a model with value embeddings needs `input_ids` as well."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("SpeedPLMModel: pass input_ids (or inputs_embeds)")
            inputs_embeds = self.embed_tokens(input_ids)
        elif len(self.value_embeds) and input_ids is None:
            raise ValueError(
                f"SpeedPLMModel: inputs_embeds alone cannot feed the {len(self.value_embeds)} value-embedding tables, "
                "which are looked up by token id; pass input_ids too"
            )
        elif input_ids is not None and input_ids.shape != inputs_embeds.shape[:2]:
            raise ValueError(
                f"SpeedPLMModel: input_ids {tuple(input_ids.shape)} vs inputs_embeds {inputs_embeds.shape}"
            )
        document_ids = document_ids_from(inputs_embeds, attention_mask, document_ids)
        if position_ids is None:
            position_ids = positions_from(document_ids)
        output_attentions = kwargs.get("output_attentions", False)
        backend = attention_backend(self.config._attn_implementation, inputs_embeds.device, output_attentions)
        if output_attentions and backend != self.config._attn_implementation:
            requested = self.config._attn_implementation
            logger.warning_once(f"output_attentions=True: eager attention for this call ({requested} returns none)")
        mask = build_attention_mask(backend, document_ids, self.config.sliding_window)  # once per forward
        cos, sin = self.rotary(position_ids)  # (B, L, D/2) each
        value_embeddings = [table(input_ids) for table in self.value_embeds]  # each (B, L, hidden)

        x = x0 = rms_norm(inputs_embeds, self.config.rms_norm_eps)  # (B, L, hidden)
        skips, half = [], len(self.layers) // 2
        for i, block in enumerate(self.layers):
            if self.skip_weights is not None and i >= half:
                x = x + self.skip_weights[i - half] * skips.pop()
            table = self.value_table_of_layer[i]
            ve = value_embeddings[table] if table is not None else None
            x = block(x, x0, ve, cos, sin, mask, **kwargs)
            if self.skip_weights is not None and i < half:
                skips.append(x)
        return BaseModelOutput(last_hidden_state=rms_norm(x, self.config.rms_norm_eps))


class SpeedPLMForMaskedLM(SpeedPLMPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: SpeedPLMConfig):
        super().__init__(config)
        self.model = SpeedPLMModel(config)
        transform = config.mlm_head == "transform"
        # "transform" head (BERT, RoBERTa, ESM2; SpeedrunningPLMs' LMHead): a hidden-size dense + GELU + norm before
        # the decoder, which then has a bias; it gives the MLM objective its own layer instead of bending the last
        # block's output towards the vocabulary.
        self.lm_head_dense = nn.Linear(config.hidden_size, config.hidden_size, bias=False) if transform else None
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=transform)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head_dense is not None:
            hidden = rms_norm(F.gelu(self.lm_head_dense(hidden)), self.config.rms_norm_eps)
        logits = self.lm_head(hidden).float()
        cap = self.config.soft_logit_cap
        # tanh soft-cap (Gemma 2 / modded-nanogpt): bounded logits keep early training from over-confident spikes.
        return cap * torch.tanh(logits / cap) if cap else logits

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,  # (B, L), -100 = not scored
        sparse_prediction: bool = False,
        **kwargs,
    ) -> MaskedLMOutput:
        """logits (B, L, V). With `sparse_prediction=True` and labels (what the trainer asks for), the LM head runs
        on the scored positions only and logits is (N_scored, V), in row-major order (ModernBERT's switch)."""
        outputs = self.model(
            input_ids, attention_mask, document_ids, position_ids, inputs_embeds, return_dict=True, **kwargs
        )
        hidden = outputs.last_hidden_state  # (B, L, hidden)
        if sparse_prediction and labels is not None:
            scored = labels != -100
            hidden, labels = hidden[scored], labels[scored]  # (N, hidden), (N,): ~15-20% of tokens, ~5x less head
        logits = self.logits(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        return MaskedLMOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


def residue_mask(input_ids, document_ids: torch.Tensor, config: SpeedPLMConfig) -> torch.Tensor:
    """(B, L) True on a protein's residues: not padding and, where input_ids are known, not <cls>/<eos>/<pad>."""
    mask = document_ids >= 0
    if input_ids is not None:
        for special in (config.cls_token_id, config.eos_token_id, config.pad_token_id):
            mask = mask & (input_ids != special)
    return mask


def pool_proteins(hidden: torch.Tensor, document_ids: torch.Tensor, residues: torch.Tensor) -> torch.Tensor:
    """(P, hidden) fp32 mean over each protein's residues. Proteins are the (row, document id) pairs, ordered by row,
    then by document id: padded rows give one per row (P = B), packed rows one per protein."""
    batch, length = document_ids.shape
    key = torch.arange(batch, device=hidden.device)[:, None] * (length + 1) + document_ids.long()  # (B, L)
    tokens = document_ids >= 0
    proteins, index = torch.unique(key[tokens], return_inverse=True)  # (P,), (T,) protein of each real token
    weight = residues[tokens].float()  # (T,)
    sums = hidden.new_zeros(len(proteins), hidden.shape[-1], dtype=torch.float32)
    sums.index_add_(0, index, hidden[tokens].float() * weight[:, None])
    counts = weight.new_zeros(len(proteins)).index_add_(0, index, weight)
    return sums / counts.clamp(min=1)[:, None]


class SpeedPLMClassificationHead(nn.Module):
    """Dense + tanh + projection on the pooled protein (EsmClassificationHead's shape, on a residue mean)."""

    def __init__(self, config: SpeedPLMConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(pooled)))


class SpeedPLMForSequenceClassification(SpeedPLMPreTrainedModel):
    def __init__(self, config: SpeedPLMConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = SpeedPLMModel(config)
        self.classifier = SpeedPLMClassificationHead(config)  # "classifier": PEFT's SEQ_CLS task saves it with LoRA
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,  # (P,) class ids or values, or (P, num_labels) multi-label / regression
        **kwargs,
    ) -> SequenceClassifierOutput:
        """One prediction per protein, logits (P, num_labels), pooled over its residues (not <cls>/<eos>/padding).
        Padded rows: P = B. Packed rows (`document_ids`): one per protein, row by row, by document id; labels in the
        same order. Loss by `config.problem_type` (regression / single- / multi-label), as EsmForSequenceClassification.
        """
        outputs = self.model(
            input_ids, attention_mask, document_ids, position_ids, inputs_embeds, return_dict=True, **kwargs
        )
        hidden = outputs.last_hidden_state
        documents = document_ids_from(hidden, attention_mask, document_ids)
        pooled = pool_proteins(hidden, documents, residue_mask(input_ids, documents, self.config))  # (P, hidden)
        logits = self.classifier(pooled.to(hidden.dtype))  # (P, num_labels)
        loss = None
        if labels is not None:
            if labels.shape[0] != logits.shape[0]:
                raise ValueError(
                    f"SpeedPLMForSequenceClassification: labels have {labels.shape[0]} rows, the batch holds "
                    f"{logits.shape[0]} proteins (one label per protein, row by row, by document id)"
                )
            loss = self.sequence_loss(logits, labels.to(logits.device))
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )

    def sequence_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # EsmForSequenceClassification's rule: the problem type is inferred once from num_labels and the label dtype.
        if self.config.problem_type is None:
            if self.num_labels == 1:
                self.config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                self.config.problem_type = "single_label_classification"
            else:
                self.config.problem_type = "multi_label_classification"
        if self.config.problem_type == "regression":
            if self.num_labels == 1:
                return F.mse_loss(logits.squeeze(-1), labels.reshape(-1).to(logits.dtype))
            return F.mse_loss(logits, labels.to(logits.dtype))
        if self.config.problem_type == "single_label_classification":
            return F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


class SpeedPLMForTokenClassification(SpeedPLMPreTrainedModel):
    def __init__(self, config: SpeedPLMConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = SpeedPLMModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,  # (B, L) class per token, -100 = ignored (<cls>, <eos>, padding)
        **kwargs,
    ) -> TokenClassifierOutput:
        """logits (B, L, num_labels), token for token, padded or packed rows alike."""
        outputs = self.model(
            input_ids, attention_mask, document_ids, position_ids, inputs_embeds, return_dict=True, **kwargs
        )
        logits = self.classifier(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits.view(-1, self.num_labels), labels.to(logits.device).view(-1), ignore_index=-100
            )
        return TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


# Hub remote code: each class registered for its Auto class here, in the file itself, so the registration also holds
# where the file is loaded from a checkpoint; auto_map() derives config.json's entries from it.
AUTO_CLASSES = {
    SpeedPLMModel: "AutoModel",
    SpeedPLMForMaskedLM: "AutoModelForMaskedLM",
    SpeedPLMForSequenceClassification: "AutoModelForSequenceClassification",
    SpeedPLMForTokenClassification: "AutoModelForTokenClassification",
}
for _cls, _auto_class in AUTO_CLASSES.items():
    _cls.register_for_auto_class(_auto_class)


def auto_map() -> dict[str, str]:
    """{"AutoModel": "modeling_speedplm.SpeedPLMModel", ...}: the names save_pretrained would write for each class."""
    return {auto: f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}" for cls, auto in AUTO_CLASSES.items()}
