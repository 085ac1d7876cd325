"""The placement plan: which role gets which resources, which roles share a bundle, and whether
the Ray cluster can hold it -- decided and printed before any model loads.

    plan = PlacementPlan.from_config(cfg)          # RLConfig
    print(plan.describe())
    plan.check(cluster_nodes())                    # PlacementError naming what does not fit
    plan.reserve(timeout_s=60)                     # one placement group for the whole run
    workers = plan.spawn(RolloutActor, "rollout", engine, policy, max_restarts=3)   # every instance
    Actor.options(**plan.options("rollout", 0)).remote(...)                         # one, by hand

A bundle holds the i-th instance of every role in a colocation group (e.g. learner rank i and
reference worker i on one GPU); each other instance gets a bundle of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("learner", "rollout", "reward", "reference")


class PlacementError(RuntimeError):
    """The plan cannot be placed on the cluster; the message says what is missing."""


@dataclass(frozen=True)
class RoleDemand:
    role: str
    count: int
    num_cpus: float
    num_gpus: float
    cpu_threads: int | None = None  # OMP_NUM_THREADS of each actor; None: Ray's (floor of num_cpus, >= 1)

    @classmethod
    def of(cls, role: str, count: int, resources: Any) -> RoleDemand:
        """From a config's `Resources` (num_cpus, num_gpus, cpu_threads)."""
        return cls(role, count, resources.num_cpus, resources.num_gpus, resources.cpu_threads)


@dataclass
class PlacementPlan:
    demands: dict[str, RoleDemand]
    bundles: list[dict[str, float]] = field(default_factory=list)
    members: list[list[tuple[str, int]]] = field(default_factory=list)  # bundle -> [(role, instance)]
    where: dict[tuple[str, int], int] = field(default_factory=dict)  # (role, instance) -> bundle
    strategy: str = "PACK"
    pg: Any = None

    @classmethod
    def build(cls, demands: list[RoleDemand], colocate: list[list[str]] | None = None,
              strategy: str = "PACK") -> PlacementPlan:
        by_role = {d.role: d for d in demands}
        plan = cls(by_role, strategy=strategy)
        grouped: set[str] = set()
        for group in colocate or []:
            unknown = [r for r in group if r not in by_role]
            if unknown:
                raise PlacementError(f"placement.colocate names role(s) {unknown} that this run does not have "
                                     f"(roles: {sorted(by_role)})")
            again = [r for r in group if r in grouped]
            if again:
                raise PlacementError(f"role(s) {again} appear in more than one placement.colocate group")
            grouped.update(group)
            for i in range(max(by_role[r].count for r in group)):
                plan._add([(r, i) for r in group if i < by_role[r].count])
        for d in demands:
            if d.role not in grouped:
                for i in range(d.count):
                    plan._add([(d.role, i)])
        return plan

    @classmethod
    def from_config(cls, cfg: Any) -> PlacementPlan:
        demands = [
            RoleDemand.of("learner", cfg.learner.ranks, cfg.learner.resources),
            RoleDemand.of("rollout", cfg.rollout.workers, cfg.rollout.resources),
            RoleDemand.of("reward", cfg.reward.workers, cfg.reward.resources),
            RoleDemand.of("reference", 0 if getattr(cfg, "reference_in_learner", False) else cfg.reference.workers,
                          cfg.reference.resources),
        ]
        return cls.build(demands, [list(g) for g in cfg.placement.colocate], cfg.placement.strategy)

    def _add(self, members: list[tuple[str, int]]) -> None:
        cpu = sum(self.demands[r].num_cpus for r, _ in members)
        gpu = sum(self.demands[r].num_gpus for r, _ in members)
        bundle = {k: round(v, 6) for k, v in (("CPU", cpu), ("GPU", gpu)) if v > 0}
        if not bundle:
            names = ", ".join(f"{r} {i}" for r, i in members)
            raise PlacementError(f"{names}: asks for no CPU and no GPU; give num_cpus or num_gpus > 0")
        for m in members:
            self.where[m] = len(self.bundles)
        self.bundles.append(bundle)
        self.members.append(members)

    # ---- checking ---------------------------------------------------------------------------
    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for b in self.bundles:
            for k, v in b.items():
                out[k] = out.get(k, 0.0) + v
        return out

    def _label(self, b: int) -> str:
        return " + ".join(f"{r} {i}" for r, i in self.members[b])

    def check(self, nodes: list[dict[str, float]]) -> list[int]:
        """Simulate the placement on nodes (their total resources); returns the node index of
        every bundle or raises PlacementError naming the bundle that does not fit."""
        if not nodes:
            raise PlacementError("the Ray cluster has no alive nodes")
        fmt = _fmt
        for b, bundle in enumerate(self.bundles):
            if not any(_fits(bundle, n) for n in nodes):
                biggest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)))
                raise PlacementError(f"bundle {b} ({self._label(b)}) needs {fmt(bundle)}, but no node has that much; "
                                     f"the largest node has {fmt(biggest)}")
        totals, have = self.totals(), _sum(nodes)
        short = {k: (v, have.get(k, 0.0)) for k, v in totals.items() if v > have.get(k, 0.0) + 1e-9}
        if short:
            what = ", ".join(f"{k}: needs {need:g}, cluster has {got:g}" for k, (need, got) in short.items())
            raise PlacementError(f"the plan does not fit the cluster ({what}); lower workers/ranks or resources, "
                                 f"or add nodes")
        free = [dict(n) for n in nodes]
        if self.strategy == "STRICT_PACK":
            homes = [i for i, n in enumerate(free) if _fits(totals, n)]
            if not homes:
                raise PlacementError(f"placement.strategy STRICT_PACK needs one node with {fmt(totals)}; "
                                     f"the nodes have {[fmt(n) for n in nodes]}")
            return [homes[0]] * len(self.bundles)
        order = sorted(range(len(self.bundles)), key=lambda b: (-self.bundles[b].get("GPU", 0),
                                                                -self.bundles[b].get("CPU", 0)))
        assigned = [-1] * len(self.bundles)
        used: set[int] = set()
        for b in order:
            candidates = [i for i, n in enumerate(free) if _fits(self.bundles[b], n)]
            if self.strategy == "STRICT_SPREAD":
                candidates = [i for i in candidates if i not in used]
            elif self.strategy == "SPREAD":
                candidates = sorted(candidates, key=lambda i: i in used)
            if not candidates:
                rule = " on a node of its own (STRICT_SPREAD)" if self.strategy == "STRICT_SPREAD" else ""
                raise PlacementError(f"bundle {b} ({self._label(b)}, {fmt(self.bundles[b])}) cannot be placed{rule}: "
                                     f"the other bundles leave {[fmt(n) for n in free]}")
            i = candidates[0]
            for k, v in self.bundles[b].items():
                free[i][k] = free[i].get(k, 0.0) - v
            assigned[b] = i
            used.add(i)
        return assigned

    def describe(self) -> str:
        lines = [f"placement plan ({self.strategy}, {len(self.bundles)} bundles, total {_fmt(self.totals())}):"]
        for b, bundle in enumerate(self.bundles):
            parts = []
            for r, i in self.members[b]:
                d = self.demands[r]
                threads = "" if d.cpu_threads is None else f", {d.cpu_threads} threads"
                parts.append(f"{r}[{i}] ({_fmt({'CPU': d.num_cpus, 'GPU': d.num_gpus})}{threads})")
            lines.append(f"  bundle {b:2d} {_fmt(bundle):>18}  " + ", ".join(parts))
        return "\n".join(lines)

    # ---- reserving ----------------------------------------------------------------------------
    def reserve(self, timeout_s: float = 60.0) -> Any:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        self.check(cluster_nodes())
        pg = placement_group(self.bundles, strategy=self.strategy, name="")
        if not pg.wait(timeout_seconds=timeout_s):
            remove_placement_group(pg)
            raise PlacementError(f"Ray did not grant the placement group ({_fmt(self.totals())}) within {timeout_s:g}s; "
                                 f"free resources now: {_fmt(ray.available_resources())}")
        self.pg = pg
        return pg

    def release(self) -> None:
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.pg)
            self.pg = None

    def spawn(self, actor: Any, role: str, *args: Any, max_restarts: int = 0, **kwargs: Any) -> list[Any]:
        """Every instance of `role` as an actor of `actor` (a ray.remote class) in its bundle, each
        built with (*args, **kwargs); Ray restarts one that dies up to `max_restarts` times. The
        one way a run's roles become actors."""
        return [actor.options(**self.options(role, i), max_restarts=max_restarts).remote(*args, **kwargs)
                for i in range(self.demands[role].count)]

    def options(self, role: str, instance: int) -> dict[str, Any]:
        """Ray actor options placing (role, instance) in its bundle."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if self.pg is None:
            raise RuntimeError("reserve() the plan before placing actors")
        d = self.demands[role]
        options = {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus,
                   "scheduling_strategy": PlacementGroupSchedulingStrategy(
                       self.pg, placement_group_bundle_index=self.where[(role, instance)])}
        if d.cpu_threads is not None:  # merged into the job's runtime env per variable; kept across restarts
            options["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(d.cpu_threads)}}
        return options


def cluster_nodes() -> list[dict[str, float]]:
    """Total resources of every alive node of the connected Ray cluster."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def _fits(need: dict[str, float], have: dict[str, float]) -> bool:
    return all(have.get(k, 0.0) + 1e-9 >= v for k, v in need.items())


def _sum(nodes: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for n in nodes:
        for k, v in n.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _fmt(res: dict[str, float]) -> str:
    return " ".join(f"{k}={res[k]:g}" for k in ("CPU", "GPU") if res.get(k)) or "nothing"
