"""PIIP-LLaVA as a Hugging Face model (llava_spec §2, §3.4-3.6, §7.2).

Module names follow transformers' Llava (``model.vision_tower``, ``model.multi_modal_projector``,
``model.language_model``, ``lm_head``) so PEFT targets, ``device_map`` and checkpointing behave as
for Llava. Images enter the sequence through placeholder ids *outside* the vocabulary (-200, the
official constant) that the processor has already expanded to one per visual token: the
sequence has its final length before the model sees it, and placeholders never reach the
embedding table, ``lm_head`` or logits processors.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ..backbone import PIIPBackbone
from .configuration import PiipLlavaConfig

# transformers renamed the KV cache argument and output field ``past_key_values`` -> ``cache`` (5.2x; the old
# name warns, and setting both makes the LLM ignore one): piip speaks whichever name the installed release uses.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _pop_cache(kwargs: dict[str, Any]) -> Any:
    """The KV cache generate handed over, under either name (removed from ``kwargs``)."""
    cache = kwargs.pop("cache", None)
    old = kwargs.pop("past_key_values", None)
    return cache if cache is not None else old


class BranchProjector(nn.Module):
    """One branch's MLP on an NCHW map: Linear -> GroupNorm -> GELU -> Linear (channels-last Linears)."""

    def __init__(self, in_dim: int, out_dim: int, num_groups: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.norm = nn.GroupNorm(num_groups, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc1(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = F.gelu(self.norm(x))
        return self.fc2(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TwoBranchProjector(nn.Module):
    """``separate_2branch_v1``: every coarser map is resized (bilinear, float32) to the fine branch's
    grid *before* its MLP; the per-branch outputs are summed. GroupNorm makes it non-token-wise:
    each image's statistics run over all its positions."""

    def __init__(self, in_dims: list[int], out_dim: int, num_groups: int = 32) -> None:
        super().__init__()
        self.projs = nn.ModuleList(BranchProjector(d, out_dim, num_groups) for d in in_dims)

    def forward(self, maps: list[Tensor]) -> Tensor:
        """NCHW maps, finest first -> (B, h*w, out_dim) visual tokens on the finest grid."""
        hw = maps[0].shape[-2:]
        out: Optional[Tensor] = None
        for m, proj in zip(maps, self.projs):
            if m.shape[-2:] != hw:
                m = F.interpolate(m.float(), size=tuple(hw), mode="bilinear", align_corners=False).to(m.dtype)
            y = proj(m)
            out = y if out is None else out + y
        return out.flatten(2).transpose(1, 2)


class PiipLlavaPreTrainedModel(PreTrainedModel):
    config_class = PiipLlavaConfig
    config: PiipLlavaConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["PIIPBackbone", "TwoBranchProjector"]  # plus the LLM's own (collected from it)
    _skip_keys_device_placement = [CACHE_NAME]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        """The tower and projector initialise themselves when built (piip's init: zero-gated
        interactions are identities); the LLM is a sub-model with its own init; this covers ``lm_head``."""
        if isinstance(module, nn.Linear) and module is getattr(self, "lm_head", None):
            std = getattr(self.config.text_config, "initializer_range", 0.02)
            nn.init.normal_(module.weight, std=std)


class PiipLlavaModel(PiipLlavaPreTrainedModel):
    """Tower + projector + the LLM body (no LM head)."""

    def __init__(self, config: PiipLlavaConfig) -> None:
        super().__init__(config)
        self.vision_tower = PIIPBackbone(config.piip_config)
        p = config.projector
        self.multi_modal_projector = TwoBranchProjector([br.out_dim for br in self.vision_tower.branches],
                                                        config.text_config.hidden_size, p["num_groups"])
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, S, S) normalised images -> (B, N_img, H) visual tokens in the LLM's dtype."""
        from .offload import execution_device, onloaded   # device_map / disk offload (accelerate)
        proj_dev = execution_device(self.multi_modal_projector)
        proj_dtype = next(self.multi_modal_projector.parameters()).dtype
        with onloaded(self.vision_tower):
            states = self.vision_tower.forward_branches(pixel_values.to(execution_device(self.vision_tower)))
        maps = [t.x.transpose(1, 2).reshape(t.x.shape[0], t.x.shape[2], *t.hw).to(proj_dev, proj_dtype)
                for t in states]
        return self.multi_modal_projector(maps).to(self.get_input_embeddings().weight.dtype)

    def embed(self, input_ids: Tensor, pixel_values: Optional[Tensor] = None) -> Tensor:
        """Token embeddings with each image's visual tokens written at its placeholder run.

        Every row with placeholders holds exactly ``N_img`` of them and reads image ``b`` (its own
        row's); rows without any (text-only samples of a mixed batch, which still get a zero image)
        add ``0 * features`` so every tower parameter stays in the graph (DDP / ZeRO)."""
        ph = self.config.image_token_id
        mask = input_ids == ph
        emb = self.get_input_embeddings()(input_ids.masked_fill(mask, 0))
        if pixel_values is None:
            if mask.any():
                raise ValueError("input_ids hold image placeholders but no pixel_values were given")
            return emb
        feats = self.get_image_features(pixel_values).to(emb.device)   # device_map may split tower and LLM
        if feats.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{feats.shape[0]} images for {input_ids.shape[0]} sequences: give one image per "
                             "sequence (a zero image for text-only ones)")
        counts = mask.sum(1)
        n = feats.shape[1]
        if not bool(((counts == 0) | (counts == n)).all()):
            raise ValueError(f"every sequence needs 0 or {n} image placeholders (one <image>, expanded by the "
                             f"processor), got {counts.tolist()}")
        used = feats[counts > 0]
        emb = emb.masked_scatter(mask.unsqueeze(-1).expand_as(emb), used.reshape(-1, used.shape[-1]))
        return emb + 0 * feats.sum() if bool((counts == 0).any()) else emb

    def forward(self, input_ids: Optional[Tensor] = None, pixel_values: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                inputs_embeds: Optional[Tensor] = None, use_cache: Optional[bool] = None,
                **kwargs: Any) -> BaseModelOutputWithPast:
        """``cache`` (or ``past_key_values`` on older transformers) goes to the LLM under the name it expects."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values)
        kwargs[CACHE_NAME] = _pop_cache(kwargs)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, use_cache=use_cache, **kwargs)


class PiipLlavaForConditionalGeneration(PiipLlavaPreTrainedModel, GenerationMixin):
    """PIIP-LLaVA with the LM head; ``generate`` returns only the new tokens (as the official code)."""

    def __init__(self, config: PiipLlavaConfig) -> None:
        super().__init__(config)
        self.model = PiipLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_llm(cls, llm: Any, tower: Any, **config_kwargs: Any) -> "PiipLlavaForConditionalGeneration":
        """A new PIIP-LLaVA around a loaded causal LM (e.g. Vicuna from ``AutoModelForCausalLM``), its
        weights taken over without a copy; ``tower`` is a :class:`piip.PIIPConfig` (freshly initialised
        tower and projector). The model is first built on the meta device, so no random LLM is made."""
        from ..backbone import PIIPBackbone
        config = PiipLlavaConfig(vision_config=tower.to_dict(), text_config=llm.config, **config_kwargs)
        with torch.device("meta"):
            model = cls(config)
        inner = model.model
        inner.vision_tower = PIIPBackbone(config.piip_config)
        inner.multi_modal_projector = TwoBranchProjector([br.out_dim for br in inner.vision_tower.branches],
                                                         config.text_config.hidden_size,
                                                         config.projector["num_groups"])
        inner.language_model = llm.get_decoder()
        model.lm_head = llm.get_output_embeddings()
        left = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta]
        if left:  # pragma: no cover - every submodule is replaced above
            raise RuntimeError(f"tensors left on the meta device: {left[:5]}")
        return model

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    @property
    def vision_tower(self) -> PIIPBackbone:
        return self.model.vision_tower

    @property
    def multi_modal_projector(self) -> TwoBranchProjector:
        return self.model.multi_modal_projector

    @property
    def language_model(self) -> nn.Module:
        return self.model.language_model

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        return self.model.get_image_features(pixel_values)

    def forward(self, input_ids: Optional[Tensor] = None, pixel_values: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                inputs_embeds: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                use_cache: Optional[bool] = None, logits_to_keep: int = 0, **kwargs: Any) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                         position_ids=position_ids, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:  # next-token cross-entropy, -100 ignored
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=self.config.ignore_index)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                      attentions=out.attentions, **{CACHE_NAME: getattr(out, CACHE_NAME)})

    @torch.no_grad()
    def generate(self, input_ids: Optional[Tensor] = None, pixel_values: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, **kwargs: Any) -> Any:
        """Build ``inputs_embeds`` (images spliced in) and let Hugging Face generate from them: the
        result holds only the new tokens. Batches must be left-padded (batch size 1 is what the
        official evaluation uses)."""
        if input_ids is None or "inputs_embeds" in kwargs:
            return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        embeds = self.model.embed(input_ids, pixel_values)
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
        return super().generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
