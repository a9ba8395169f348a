"""Medusa tree verification: the heads' top-k candidates for several positions, checked in one forward.

The decode step of ``speculative={"method": "medusa", "heads": DIR, "tree": ...}``. Each greedy request
lays out a candidate tree (:mod:`llmlab.medusa.tree`: node ``p`` holds head ``len(p)``'s rank-``p[-1]``
token) after its newest token; the target runs all of them in one forward, each node attending to the
cached context and its own ancestors only (the paged cache's explicit tree mask, positions by depth). The
longest path whose every token is the target's greedy choice is accepted, plus the target's token after it;
that path's keys/values move to consecutive cache positions and the rest is rolled back. The output is the
target's greedy output, as with every proposer.

Sampled requests cannot take a tree (the acceptance rule of :func:`~llmlab.infer.speculative.verify`
checks one chain against one proposal distribution), so in the same batch they draft the tree's chain of
first choices and are verified exactly as a Medusa chain: their output distribution stays the target's.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from llmlab.errors import LLMLabError
from llmlab.infer.runner import ModelRunner, score
from llmlab.infer.sampling import process_logits
from llmlab.infer.scheduler import Request, Scheduler
from llmlab.infer.speculative import SpeculativeConfig, SpeculativeDecoder, _probs, verify
from llmlab.medusa.tree import DEFAULT_TREE, build_tree, tree_tokens


class MedusaTreeDecoder(SpeculativeDecoder):
    """Draft-and-verify with a Medusa candidate tree (see the module docstring)."""

    def __init__(self, scheduler: Scheduler, runner: ModelRunner, cfg: SpeculativeConfig):
        super().__init__(scheduler, runner, cfg, None)
        if scheduler.cache.window is not None:
            raise LLMLabError("a Medusa tree does not combine with a sliding window (use a chain: no 'tree')")
        K = self.heads.num_heads
        choices = [c for c in DEFAULT_TREE if len(c) <= K] if cfg.tree == "default" else cfg.tree
        if not isinstance(choices, list) or not all(isinstance(c, (list, tuple)) for c in choices):
            raise LLMLabError(
                f"speculative 'tree' must be a list of rank paths or 'default', got {cfg.tree!r}"
            )
        self.tree = build_tree(choices, K)
        # Rooms are counted up to the tree's depth; chain fallbacks (sampled requests, near max_tokens) draft
        # along the tree's first-choice chain, as far as it goes.
        self.cfg = dataclasses.replace(cfg, num_tokens=self.tree.max_depth)
        self.medusa.num = self.tree.max_depth  # heads kept per request: one per tree level
        # Nodes by how likely a step ends on them (few and low ranks first): the ones fused first.
        paths = self.tree.paths
        self.fuse_order = sorted(range(len(paths)), key=lambda i: (len(paths[i]) + sum(paths[i]), i))

    def decode_step(self, reqs: list[Request]) -> bool:
        sched, runner, tree = self.scheduler, self.runner, self.tree
        cache = runner.cache
        T = tree.size
        tokens = [r.all_token_ids for r in reqs]
        if sched.max_model_len is not None and any(len(t) - 1 + T > sched.max_model_len for t in tokens):
            return super().decode_step(reqs)  # the tree's slots would pass the context: chain steps
        rooms = [self._room(r, t) for r, t in zip(reqs, tokens, strict=True)]
        if max(rooms) <= 0 or not sched.fits(reqs, T):
            return False
        medusa = self.medusa
        ready = [medusa.ready(r, t) for r, t in zip(reqs, tokens, strict=True)]
        on_tree = [
            ok and r.params.greedy and room >= tree.max_depth
            for r, ok, room in zip(reqs, ready, rooms, strict=True)
        ]
        longest = len(tree.chain) - 1
        chain_ks = [
            min(room, longest) if ok and not tr else 0
            for ok, tr, room in zip(ready, on_tree, rooms, strict=True)
        ]
        proposals = self._medusa(reqs, tokens, chain_ks)
        ids = [[t[-1]] * T for t in tokens]
        tree_rows = [i for i, tr in enumerate(on_tree) if tr]
        if tree_rows:
            logits = medusa.logits([reqs[i] for i in tree_rows], tree.max_depth)
            for row, i in enumerate(tree_rows):
                topk = [logits[row, d].topk(w).indices.tolist() for d, w in enumerate(tree.widths)]
                ids[i] = tree_tokens(tree, tokens[i][-1], topk)
        for i, (drafts, _) in enumerate(proposals):
            for j, d in enumerate(drafts):
                ids[i][tree.chain[j + 1]] = d
        cache.tree = (tree.depth, tree.ancestors)
        try:
            out = runner.forward(
                torch.tensor(ids, device=runner.device),
                [r.seq_id for r in reqs],
                last_only=False,
                with_hidden=True,
                extra_rows=medusa.extra_rows(len(reqs), self.fuse_order),
            )
        finally:
            cache.tree = None
        logits, hidden, head_rows = out if len(out) == 3 else (*out, None)
        for row, r in enumerate(reqs):
            if on_tree[row]:
                path, nxt, processed = self._walk(r, logits[row], ids[row])
                self.stats["proposed"] += tree.max_depth
            else:
                drafts, q = proposals[row]
                path, nxt, processed = self._chain(r, logits[row], drafts, q)
                self.stats["proposed"] += len(drafts)
            self.stats["steps"] += 1
            self.stats["accepted"] += len(path)
            visit = [0, *path]
            finished = False
            for i, tok in enumerate([ids[row][n] for n in path] + [nxt]):
                lp, top = score(logits[row, visit[i]], processed[i], tok, r)
                self.stats["emitted"] += 1
                if sched.append_token(r, tok, lp, top):
                    finished = True
                    break
            if finished:
                continue
            start = len(tokens[row]) - 1  # the root's position: the cache held everything before it
            moves = [(start + n, start + 1 + i) for i, n in enumerate(path) if n != i + 1]
            if moves:
                cache.move(r.seq_id, [s for s, _ in moves], [d for _, d in moves])
            cache.truncate(r.seq_id, start + 1 + len(path))
            medusa.keep(r, row, visit[-1], hidden, head_rows)
        return True

    def _walk(self, req: Request, logits: Tensor, ids: list[int]) -> tuple[list[int], int, list[Tensor]]:
        """Greedy: follow the children whose token is the target's choice; ``(path, next token, processed
        logits at the root and each path node)``."""
        node, path, processed = 0, [], []
        while True:
            proc = process_logits(
                logits[node], req.params, req.prompt_ids, req.output_ids + [ids[n] for n in path]
            )
            processed.append(proc)
            best = int(proc.argmax())
            child = next((c for c in self.tree.children[node] if ids[c] == best), None)
            if child is None:
                return path, best, processed
            path.append(child)
            node = child

    def _chain(
        self, req: Request, logits: Tensor, drafts: list[int], q: Tensor | None
    ) -> tuple[list[int], int, list[Tensor]]:
        """A chain along the tree's first choices, verified by the exact acceptance rule."""
        nodes = self.tree.chain[: len(drafts) + 1]
        processed, p = [], []
        for i, n in enumerate(nodes):
            proc = process_logits(logits[n], req.params, req.prompt_ids, req.output_ids + drafts[:i])
            processed.append(proc)
            p.append(_probs(proc, req.params))
        accepted, nxt = verify(torch.stack(p), q, drafts, self.runner.generator_for(req), req.params.greedy)
        return nodes[1 : accepted + 1], nxt, processed
