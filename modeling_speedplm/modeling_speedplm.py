"""SpeedPLM: an ESM2-style masked-LM encoder in the modded-nanogpt lineage.

Per block (pre-norm, parameter-free RMSNorm):  x = a*x + b*x0 ;  x += Attn(norm(x)) ;  x += MLP(norm(x))
  Attn: fused qkv -> QK-norm -> rotary (positions restart per protein) -> value-embedding mix -> attention over the
        protein's own tokens only -> zero-initialised output projection.
  MLP:  up -> ReLU^2 -> zero-initialised down projection.
Around the blocks: U-Net skips from block i to block L-1-i, value-embedding tables shared by block j and L-1-j, and
a tanh soft-capped LM head. Each choice is a config switch. Shapes: B batch, L tokens per row, H heads, D head dim.

Two input forms give identical results: padded rows (`attention_mask`) and packed rows (`document_ids`, -1 on padding,
with `position_ids` restarting per protein; both are derived if omitted).
"""

import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.dynamic_module_utils import custom_object_save
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput

from .attention_speedplm import ATTENTION_FUNCTIONS, build_attention_mask, resolve_implementation
from .card_speedplm import model_card
from .configuration_speedplm import SpeedPLMConfig
from .kernels_speedplm import apply_rotary, select_kernels
from .tokenization_speedplm import build_tokenizer


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    # Parameter-free (modded-nanogpt): gains would be redundant with the learned scalars and the next projection.
    return F.rms_norm(x, (x.size(-1),), eps=eps)


def document_ids_from(input_ids, attention_mask, document_ids):
    """(B, L) document id per token, -1 on padding."""
    if document_ids is None:
        document_ids = torch.zeros_like(input_ids, dtype=torch.int32)
    if attention_mask is not None:
        document_ids = document_ids.masked_fill(attention_mask == 0, -1)
    return document_ids


def positions_from(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) position of each token inside its own document: 0 at every document start."""
    idx = torch.arange(document_ids.shape[1], device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


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
    def __init__(self, config: SpeedPLMConfig, has_value_embedding: bool):
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.qk_norm, self.eps = config.qk_norm, config.rms_norm_eps
        self.scale = self.head_dim**-0.5
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.o_proj.zero_init = True  # each block starts as the identity (modded-nanogpt)
        # v = a*v + b*ve: the learned mix lets each block choose how much raw token identity enters its values.
        self.value_mix = nn.Parameter(torch.tensor([0.5, 0.5])) if has_value_embedding else None

    def forward(self, x, value_embedding, cos, sin, mask, implementation: str, kernels):
        batch, length, _ = x.shape
        q, k, v = self.qkv_proj(x).view(batch, length, 3, self.num_heads, self.head_dim).unbind(2)  # (B, L, H, D)
        if self.qk_norm:  # bounds attention logits, which lets Muon use larger learning rates
            q, k = kernels.qk_norm_rotary(q, k, cos, sin, self.eps)  # fused RMSNorm + rotary
        else:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.value_mix is not None:
            v = self.value_mix[0] * v + self.value_mix[1] * value_embedding.view_as(v)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
        out = ATTENTION_FUNCTIONS[implementation](q, k, v, mask, self.scale)  # (B, L, H, D)
        return self.o_proj(out.reshape(batch, length, -1))


class SpeedPLMMLP(nn.Module):
    def __init__(self, config: SpeedPLMConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.down_proj.zero_init = True

    def forward(self, x, kernels):
        # ReLU^2 (So et al. 2021, Primer; used by modded-nanogpt): as good as GELU-gated MLPs with two matrices.
        return self.down_proj(kernels.linear_relu2(x, self.up_proj.weight))  # fused up-projection + ReLU^2


class SpeedPLMBlock(nn.Module):
    def __init__(self, config: SpeedPLMConfig, has_value_embedding: bool):
        super().__init__()
        self.eps = config.rms_norm_eps
        self.attn = SpeedPLMAttention(config, has_value_embedding)
        self.mlp = SpeedPLMMLP(config)
        # x = a*x + b*x0 (modded-nanogpt): every block can re-read the token embedding; starts at a=1, b=0.
        self.x0_mix = nn.Parameter(torch.tensor([1.0, 0.0])) if config.x0_mixing else None

    def forward(self, x, x0, value_embedding, cos, sin, mask, implementation, kernels):
        if self.x0_mix is not None:
            x = self.x0_mix[0] * x + self.x0_mix[1] * x0
        x = x + self.attn(rms_norm(x, self.eps), value_embedding, cos, sin, mask, implementation, kernels)
        return x + self.mlp(rms_norm(x, self.eps), kernels)


class SpeedPLMPreTrainedModel(PreTrainedModel):
    config_class = SpeedPLMConfig
    config: SpeedPLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules = ["SpeedPLMBlock"]
    _supports_sdpa = True
    _supports_flex_attn = True

    def save_pretrained(self, save_directory, *args, training_summary: str | None = None, **kwargs):
        """Weights + config + remote code, plus the tokenizer and a model card, so the folder is self-contained."""
        os.makedirs(save_directory, exist_ok=True)
        if isinstance(getattr(self, "model", None), SpeedPLMModel):  # auto_map gains AutoModel -> the base model
            custom_object_save(self.model, save_directory, config=self.config)
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            build_tokenizer(self.config.max_position_embeddings).save_pretrained(save_directory)
            card = model_card(self.config, self.num_parameters(), training_summary=training_summary)
            with open(os.path.join(save_directory, "README.md"), "w") as f:
                f.write(card)

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


class SpeedPLMModel(SpeedPLMPreTrainedModel):
    def __init__(self, config: SpeedPLMConfig):
        super().__init__(config)
        n_layers, n_tables = config.num_hidden_layers, config.value_embeddings
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        # Value embeddings (modded-nanogpt, @Grad62304977): table j feeds the values of block j and of its U-Net
        # mirror L-1-j, the blocks closest to the input and to the output, where token identity helps most; extra
        # parameters but no extra matrix products.
        self.value_embeds = nn.ModuleList(nn.Embedding(config.vocab_size, config.hidden_size) for _ in range(n_tables))
        self.value_table_of_layer = [None] * n_layers
        for j in range(n_tables):
            self.value_table_of_layer[j] = self.value_table_of_layer[n_layers - 1 - j] = j
        self.layers = nn.ModuleList(
            SpeedPLMBlock(config, self.value_table_of_layer[i] is not None) for i in range(n_layers)
        )
        # U-Net (SpeedrunningPLMs / modded-nanogpt): block L/2+i receives block L/2-1-i's output, learned weight.
        self.skip_weights = nn.Parameter(torch.ones(n_layers // 2)) if config.unet else None
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, L)
        attention_mask: torch.Tensor | None = None,  # (B, L), 1 = token, 0 = padding
        document_ids: torch.Tensor | None = None,  # (B, L), protein index within the row, -1 = padding
        position_ids: torch.Tensor | None = None,  # (B, L), restart at 0 per protein
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutput:
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        document_ids = document_ids_from(input_ids, attention_mask, document_ids)
        if position_ids is None:
            position_ids = positions_from(document_ids)
        implementation = resolve_implementation(
            self.config._attn_implementation, input_ids.device, torch.is_grad_enabled()
        )
        mask = build_attention_mask(implementation, document_ids, self.config.sliding_window)  # once per forward
        cos, sin = self.rotary(position_ids)  # (B, L, D/2) each
        kernels = select_kernels(self.config.kernels, input_ids.device)
        value_embeddings = [table(input_ids) for table in self.value_embeds]  # each (B, L, hidden)

        x = x0 = rms_norm(self.embed_tokens(input_ids), self.config.rms_norm_eps)  # (B, L, hidden)
        hidden_states = [x] if output_hidden_states else None
        skips, half = [], len(self.layers) // 2
        for i, block in enumerate(self.layers):
            if self.skip_weights is not None and i >= half:
                x = x + self.skip_weights[i - half] * skips.pop()
            table = self.value_table_of_layer[i]
            ve = value_embeddings[table] if table is not None else None
            x = block(x, x0, ve, cos, sin, mask, implementation, kernels)
            if self.skip_weights is not None and i < half:
                skips.append(x)
            if output_hidden_states:
                hidden_states.append(x)
        x = rms_norm(x, self.config.rms_norm_eps)
        return BaseModelOutput(last_hidden_state=x, hidden_states=tuple(hidden_states) if hidden_states else None)


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

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

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

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,  # (B, L), -100 = not scored
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MaskedLMOutput:
        """In training with labels, the LM head runs only on scored positions and `logits` is (N_scored, V)."""
        outputs = self.model(
            input_ids, attention_mask, document_ids, position_ids, output_hidden_states=output_hidden_states
        )
        hidden = outputs.last_hidden_state  # (B, L, hidden)
        loss = None
        if labels is not None and self.training:
            scored = labels != -100
            logits = self.logits(hidden[scored])  # (N, V): ~15-20% of tokens, so ~5x less head work
            loss = F.cross_entropy(logits, labels[scored])
        else:
            logits = self.logits(hidden)  # (B, L, V)
            if labels is not None:
                loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)
