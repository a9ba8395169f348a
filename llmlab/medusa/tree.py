"""Medusa candidate trees: which of the heads' top-k tokens to verify together in one target forward.

A tree is given as Medusa's "choices": paths of top-k ranks, one rank per head, e.g. ``[[0], [1], [0, 0]]``
= head 1's best and second-best token, and head 2's best after head 1's best. Node ``()`` is the root (the
newest committed token). Nodes are laid out breadth-first (by depth, then by path), so the chain of
first choices ``(0,), (0, 0), ...`` is always present (every path's prefixes are added) and a request
that cannot use the tree (sampled requests: the acceptance rule verifies one chain) rides along it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llmlab.errors import LLMLabError

# A sparse tree of 10 nodes (root included): wide where the heads are uncertain (head 1), deep along the
# best guesses. On a CPU each extra verified token costs compute, so trees stay small.
DEFAULT_TREE = [[0], [1], [2], [0, 0], [1, 0], [0, 1], [0, 0, 0], [0, 0, 1], [0, 0, 0, 0]]


@dataclass
class CandidateTree:
    paths: list[tuple[int, ...]]  # node i's path of ranks; node 0 is the root ()
    depth: Tensor  # [T] long: node i sits ``depth[i]`` positions after the root
    ancestors: Tensor  # [T, T] bool: node j is node i or one of its ancestors
    children: list[list[int]]  # node -> its children's indices
    chain: list[int]  # the nodes of the first-choice chain, root first
    widths: list[int]  # per head (depth 1..D): the top-k needed

    @property
    def size(self) -> int:
        return len(self.paths)

    @property
    def max_depth(self) -> int:
        return len(self.widths)


def build_tree(choices: list[list[int]], num_heads: int) -> CandidateTree:
    """A :class:`CandidateTree` from Medusa-style ``choices`` (missing prefixes are added)."""
    paths: set[tuple[int, ...]] = {()}
    for c in choices:
        path = tuple(int(x) for x in c)
        if not path or any(x < 0 for x in path):
            raise LLMLabError(f"speculative 'tree': a path must be non-empty ranks >= 0, got {list(c)}")
        if len(path) > num_heads:
            raise LLMLabError(
                f"speculative 'tree': path {list(c)} is deeper than the {num_heads} Medusa heads"
            )
        paths.update(path[:i] for i in range(1, len(path) + 1))
    ordered = sorted(paths, key=lambda p: (len(p), p))
    index = {p: i for i, p in enumerate(ordered)}
    T = len(ordered)
    ancestors = torch.zeros(T, T, dtype=torch.bool)
    children: list[list[int]] = [[] for _ in range(T)]
    for i, p in enumerate(ordered):
        for d in range(len(p) + 1):
            ancestors[i, index[p[:d]]] = True
        if p:
            children[index[p[:-1]]].append(i)
    chain = [0]
    while (0,) * len(chain) in index:
        chain.append(index[(0,) * len(chain)])
    depth_max = max(len(p) for p in ordered)
    widths = [1 + max(p[d] for p in ordered if len(p) > d) for d in range(depth_max)]
    depth = torch.tensor([len(p) for p in ordered], dtype=torch.long)
    return CandidateTree(ordered, depth, ancestors, children, chain, widths)


def tree_tokens(tree: CandidateTree, root: int, topk: list[list[int]]) -> list[int]:
    """Token of every node: the root's, then for path ``p`` head ``len(p)``'s rank-``p[-1]`` token
    (``topk[d]``: head ``d+1``'s tokens, best first)."""
    return [root] + [topk[len(p) - 1][p[-1]] for p in tree.paths[1:]]
