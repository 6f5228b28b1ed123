"""`init-router`: routers initialised from data instead of at random.

Each selected layer's `RouterInit.kind` says how (the recipe's `router_init`):

- `prompts`: per expert, positive (and optionally negative) prompts. The base model runs once
  over all of them; a layer's row j is the mean of the states its FFN received over expert j's
  positive prompt tokens, less the mean over its negative ones, scaled to unit length (the
  "hidden" gates of mergekit-moe, taken at the router's own input and averaged over every token,
  since the router routes every token, not only the last one);
- `embeddings`: the same from the input token embeddings of the prompts, one row set for every
  layer (mergekit's "cheap_embed"), with no forward pass;
- `kmeans`: the states of calibration text at each layer's input clustered by spherical k-means
  (`sparsify.kmeans`), one unit centroid per router row.

With router groups G (granular upcycling) the rows are per group and repeated G times, so the
prompts list one entry per group. The rows go into `plan.router_weights`, where every executor
takes them from (`sparsify.init.router_init_weight`), and `RouterInit.data` records what they
were computed from. Hidden states are computed in bounded memory (`sparsify.hidden_states`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import OptionError
from ..hidden_states import input_embeddings, load_tokenizer, max_length, site_inputs, token_batch
from ..init import derived_generator
from ..kmeans import spherical_kmeans
from ..layer_plan import ROUTER_INITS
from ..plan import FFNSite
from ..prompts import PromptSet, prompt_set
from .infra import Pass, PassContext, PreconditionError

__all__ = ["InitRouter", "CALIBRATION_TOKENS", "check_router_data"]

CALIBRATION_TOKENS = 4096  # calibration tokens used at most (their states at one layer are held at a time)
_NEEDS_PROMPTS = ("prompts", "embeddings")


def check_router_data(kinds: set[str], prompts: Any, calibration: Any) -> None:
    """Refuse data that the router initialisations `kinds` lack or do not use."""
    needs = sorted(kinds & set(_NEEDS_PROMPTS))
    if needs and prompts is None:
        raise OptionError(f"router_init '{needs[0]}' needs prompts: a YAML or JSON file listing each expert's prompts")
    if "kmeans" in kinds and calibration is None:
        raise OptionError("router_init 'kmeans' needs calibration: a text file whose hidden states are clustered")
    if prompts is not None and not needs:
        raise OptionError("prompts are used by router_init 'prompts' or 'embeddings' only; set router_init")
    if calibration is not None and "kmeans" not in kinds:
        raise OptionError("calibration text is used by router_init 'kmeans' only; set router_init")


class _Calibration:
    """A calibration text file, checked readable at once; its start is read when needed."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        digest = hashlib.sha256()
        try:
            with open(self.path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
        except FileNotFoundError:
            raise OptionError(f"calibration file '{self.path}' does not exist") from None
        except (IsADirectoryError, OSError) as err:
            raise OptionError(f"cannot read calibration file '{self.path}' ({err.strerror})") from None
        self.sha256 = digest.hexdigest()

    def text(self, chars: int) -> str:
        with open(self.path, "rb") as fh:
            raw = fh.read(chars * 4)  # utf-8: at most 4 bytes a character
        text = raw.decode("utf-8", errors="ignore")[:chars]
        if not text.strip():
            raise OptionError(f"calibration file '{self.path}' holds no text")
        return text


class InitRouter(Pass):
    """Compute the routers of the selected layers whose `RouterInit.kind` is data-derived, from
    the still dense model (run it before the FFNs are rewritten; `UpcycleFFN` runs it itself).

    `kind` overrides every layer's kind when given. `prompts`: a YAML or JSON file, or a list of
    `ExpertPrompts` (see `sparsify.prompts`). `calibration`: a text file. `tokenizer`: a tokenizer
    or its directory (default: the one beside the model's checkpoint). A model on the meta
    device is run layer by layer from the pipeline's checkpoint (`PassManager.run(weights=)`)."""

    name = "init-router"

    def __init__(self, kind: str | None = None, prompts: Any = None, calibration: str | os.PathLike | None = None,
                 tokenizer: Any = None, calibration_tokens: int = CALIBRATION_TOKENS):
        if kind is not None and kind not in ROUTER_INITS:
            raise OptionError(f"router_init must be one of {', '.join(ROUTER_INITS)}, got {kind!r}")
        if kind is not None:
            check_router_data({kind}, prompts, calibration)
        if not isinstance(calibration_tokens, int) or calibration_tokens < 1:
            raise OptionError(f"calibration_tokens must be a positive integer, got {calibration_tokens!r}")
        self.kind = kind
        self.prompts: PromptSet | None = prompt_set(prompts) if prompts is not None else None
        self.calibration = _Calibration(calibration) if calibration is not None else None
        self.tokenizer = tokenizer
        self.calibration_tokens = calibration_tokens

    def _kind(self, ctx: PassContext, site: FFNSite) -> str:
        return self.kind or ctx.plan.layer(site).router.kind

    def _todo(self, ctx: PassContext) -> list[FFNSite]:
        return [s for s in ctx.plan.selected_sites if self._kind(ctx, s) != "random" and s.path not in ctx.plan.router_weights]

    def requires(self, ctx: PassContext) -> None:
        if ctx.plan.selected and not ctx.plan.layers:
            raise PreconditionError("init-router needs the layer plans; run it after upcycle-ffn has planned them")
        for site in self._todo(ctx):
            if type(ctx.model.get_submodule(site.path)).__name__ == "SparseMoE":
                raise PreconditionError(f"init-router reads the dense model's hidden states, and {site.path} is already "
                                        "an MoE; run it before the rewrite (upcycle-ffn runs it when given router_init)")
        meta = any(p.device.type == "meta" for p in ctx.model.parameters())
        if meta and ctx.weights is None and self._todo(ctx):
            raise PreconditionError("init-router runs the model, whose parameters are on the meta device; "
                                    "give the checkpoint: PassManager.run(model, weights=Checkpoint(path))")

    def call(self, ctx: PassContext) -> bool:
        sites = self._todo(ctx)
        kinds = {self._kind(ctx, s) for s in sites}
        if not sites:
            return False
        check_router_data(kinds, self.prompts, self.calibration)
        for site in sites:
            ctx.plan.layer(site).router.kind = self._kind(ctx, site)
        weights = ctx.weights if any(p.device.type == "meta" for p in ctx.model.parameters()) else None
        by_kind = {k: [s for s in sites if self._kind(ctx, s) == k] for k in kinds}
        if "prompts" in by_kind:
            self._from_prompts(ctx, by_kind["prompts"], weights)
        if "embeddings" in by_kind:
            self._from_embeddings(ctx, by_kind["embeddings"], weights)
        if "kmeans" in by_kind:
            self._from_calibration(ctx, by_kind["kmeans"], weights)
        return True

    def _rows(self, ctx: PassContext, site: FFNSite) -> int:
        router = ctx.plan.layer(site).router
        return ctx.plan.layer(site).moe.num_experts // router.groups

    def _store(self, ctx: PassContext, site: FFNSite, rows: torch.Tensor, data: dict[str, Any]) -> None:
        groups = ctx.plan.layer(site).router.groups
        ctx.plan.router_weights[site.path] = rows.float().repeat_interleave(groups, dim=0).contiguous()
        ctx.plan.layer(site).router.data = data

    def _check_prompt_count(self, ctx: PassContext, sites: list[FFNSite]) -> PromptSet:
        assert self.prompts is not None
        n = len(self.prompts.experts)
        for site in sites:
            rows, layer = self._rows(ctx, site), ctx.plan.layer(site)
            if rows != n:
                groups = f" in router groups of {layer.router.groups}" if layer.router.groups > 1 else ""
                raise OptionError(f"the prompts list {n} experts and {site.path} routes to {rows} "
                                  f"({layer.moe.num_experts} experts{groups}); give one entry of prompts per expert")
        return self.prompts

    def _prompt_texts(self, prompts: PromptSet) -> tuple[list[str], list[tuple[int, int]]]:
        texts, owner = [], []
        for j, p in enumerate(prompts.experts):
            for sign, group in ((0, p.positive), (1, p.negative)):
                texts += group
                owner += [(j, sign)] * len(group)
        return texts, owner

    def _from_prompts(self, ctx: PassContext, sites: list[FFNSite], weights: Any) -> None:
        prompts = self._check_prompt_count(ctx, sites)
        tokenizer = load_tokenizer(self.tokenizer, ctx.model, "router_init 'prompts'")
        texts, owner = self._prompt_texts(prompts)
        ids, mask = token_batch(tokenizer, texts, max_length(ctx.model))
        n = len(prompts.experts)
        by_site = {s.path: s for s in sites}

        def on_input(path: str, x: torch.Tensor) -> None:
            per_row = (x.double() * mask.unsqueeze(-1)).sum(dim=1)  # [B, H], padding masked out
            sums = torch.zeros(n, 2, x.shape[-1], dtype=torch.float64)
            counts = torch.zeros(n, 2, dtype=torch.float64)
            for b, (j, sign) in enumerate(owner):
                sums[j, sign] += per_row[b]
                counts[j, sign] += float(mask[b].sum())
            rows = sums[:, 0] / counts[:, 0, None]
            negative = counts[:, 1] > 0
            rows[negative] -= sums[negative, 1] / counts[negative, 1, None]
            self._store(ctx, by_site[path], F.normalize(rows, dim=1),
                        {**prompts.describe(), "tokens": int(mask.sum()), "states": "mean FFN input over the prompts' tokens"})

        site_inputs(ctx.model, list(by_site), ids, mask, on_input, weights)

    def _from_embeddings(self, ctx: PassContext, sites: list[FFNSite], weights: Any) -> None:
        prompts = self._check_prompt_count(ctx, sites)
        tokenizer = load_tokenizer(self.tokenizer, ctx.model, "router_init 'embeddings'")
        embed = input_embeddings(ctx.model, weights)
        rows = []
        for p in prompts.experts:
            parts = []
            for group in (p.positive, p.negative):
                ids, mask = token_batch(tokenizer, group, max_length(ctx.model)) if group else (None, None)
                parts.append(embed[ids[mask.bool()]].double().mean(dim=0) if group else None)
            rows.append(parts[0] - parts[1] if parts[1] is not None else parts[0])
        rows = F.normalize(torch.stack(rows), dim=1)
        for site in sites:
            if rows.shape[1] != site.hidden_size:
                raise OptionError(f"the token embeddings are {rows.shape[1]} wide and {site.path}'s router reads "
                                  f"{site.hidden_size}; use router_init 'prompts'")
            self._store(ctx, site, rows, {**prompts.describe(), "states": "mean input token embedding of the prompts"})

    def _from_calibration(self, ctx: PassContext, sites: list[FFNSite], weights: Any) -> None:
        assert self.calibration is not None
        tokenizer = load_tokenizer(self.tokenizer, ctx.model, "router_init 'kmeans'")
        budget = self.calibration_tokens
        tokens = list(tokenizer(self.calibration.text(budget * 32))["input_ids"])[:budget]
        need = max(self._rows(ctx, s) for s in sites)
        if len(tokens) < need:
            raise OptionError(f"calibration file '{self.calibration.path}' gives {len(tokens)} tokens, fewer than the "
                              f"{need} centroids to find; give more text")
        length = max_length(ctx.model)
        ids = torch.zeros(-(-len(tokens) // length), length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        ids.view(-1)[: len(tokens)] = torch.tensor(tokens)
        mask.view(-1)[: len(tokens)] = 1
        by_site = {s.path: s for s in sites}
        data = {"calibration": self.calibration.path.name, "sha256": self.calibration.sha256, "tokens": len(tokens),
                "states": "spherical k-means of the FFN input over the calibration tokens"}

        def on_input(path: str, x: torch.Tensor) -> None:
            site = by_site[path]
            g = derived_generator(ctx.plan.seed, "kmeans", path)
            self._store(ctx, site, spherical_kmeans(x[mask.bool()], self._rows(ctx, site), g), data)

        site_inputs(ctx.model, list(by_site), ids, mask, on_input, weights)

    def __repr__(self) -> str:
        return f"InitRouter(kind={self.kind!r})"
