"""The attack drill (issue 23, drill 2) in Flower's Simulation Engine: 20 % of the cameras send sign-flipped, noise,
x10 scaled or malformed updates (drill.attack); the final mean per-camera val mAP50 of the global model per strategy,
against the clean runs, and which updates the screening rejected. Also drill 1 in simulation: 30 % of the cameras
crash in round 2 and come back."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from shared.env import setup_offline

setup_offline()  # the offline variables, before any library reads them
from server.federation.events import read_events  # noqa: E402
from shared.cpu_isa import isa_summary  # noqa: E402
from shared.run_dir import RunDir  # noqa: E402

SCENARIO = Path(__file__).parent / "scenarios" / "demo.toml"
STRATEGIES = ("fedavg", "fedmedian", "fedtrimmedavg", "krum")
# x10 and malformed updates never reach a strategy (the screening rejects them first): one run each shows it.
ARMS = [(s, a) for s in STRATEGIES for a in ("none", "signflip", "noise")] + [("fedavg", "scale"),
                                                                            ("fedavg", "malformed")]
COLUMNS = ("none", "signflip", "noise", "scale", "malformed")


def simulate(run: Path, scenario: Path, rounds: int, cameras: int, sets: list[str]) -> float:
    flags = [x for s in sets for x in ("--set", s)]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "server.cli", "simulate", "--scenario", str(scenario), "--rounds",
                    str(rounds), "--run-dir", str(run), "--timeout", "3600", "--dashboard-port", "0",
                    "--set", "snapshot.enabled=false", "--set", f"data.cameras={cameras}", *flags],
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def outcome(run: Path, attackers: int) -> dict:
    """The last central evaluation, and the rejected updates: by attackers (the first partitions, client/attack.py)
    and by honest cameras."""
    events = read_events(RunDir(run).events)
    central = [e for e in events if e["kind"] == "round_end"][-1]["data"]["central"]
    clients = [c for e in events if e["kind"] == "train_result" for c in e["data"]["clients"]]
    bad = [c for c in clients if c["metrics"].get("partition", attackers) < attackers]
    return {"map50": central["cam-map50"], "attacker-updates": len(bad),
            "attackers-rejected": sum(not c["ok"] for c in bad),
            "honest-rejected": sum(not c["ok"] for c in clients) - sum(not c["ok"] for c in bad),
            "reason": next((c["reason"] for c in bad if not c["ok"]), "")}


def drill_crash(work: Path, scenario: Path = SCENARIO, rounds: int = 5, cameras: int = 10) -> tuple[str, ...]:
    """Drill 1 in simulation: 30 % of the cameras crash in round 2 after fine-tuning (their ClientApp raises), and
    answer again from round 3."""
    crashed = round(0.3 * cameras)
    run = work / "fedavg-crash"
    simulate(run, scenario, rounds, cameras, ["drill.attack=crash", "drill.attackers=0.3", "drill.crash-round=2",
                                               f"fed.min-nodes={cameras}", f"fed.central-every={rounds}"])
    events = read_events(RunDir(run).events)
    results = {e["round"]: e["data"] for e in events if e["kind"] == "train_result"}
    failed = [c["reason"] for c in results[2]["clients"] if not c["ok"]]
    after = [results[r]["accepted"] for r in sorted(results) if r > 2]
    ended = sum(e["kind"] == "round_end" for e in events) - 1  # round 0 is the start's evaluation
    held = (f"round 2 completed with {results[2]['accepted']} of {cameras}, {len(failed)} failures logged; "
            f"rounds 3-{rounds} accepted {after}; {ended} of {rounds} rounds ended")
    reason = failed[0] if failed else "none"
    return ("1 camera crash (simulation)", f"{crashed} of {cameras} ClientApps raise in round 2 after fine-tuning",
            held, f"reason logged: '{reason[:120]}'")


def drill_attacks(work: Path, scenario: Path = SCENARIO, rounds: int = 5, cameras: int = 10,
                  arms=ARMS) -> tuple[list[tuple[str, str, str, str]], list[str]]:
    """Runs every (strategy, attack) arm; returns the drill table's row and a per-arm table."""
    got, lines = {}, []
    attackers = round(0.2 * cameras)
    for strategy, attack in arms:
        sets = [f"fed.strategy={strategy}", f"drill.attack={attack}", "drill.attackers=0.2",
                f"fed.krum-byzantine={attackers}", f"fed.min-nodes={cameras}", f"fed.central-every={rounds}"]
        wall = simulate(work / f"{strategy}-{attack}", scenario, rounds, cameras, sets)
        got[strategy, attack] = out = outcome(work / f"{strategy}-{attack}", attackers if attack != "none" else 0)
        print(f"{strategy} / {attack}: mAP50 {out['map50']:.3f}, rejected {out['attackers-rejected']} of "
              f"{out['attacker-updates']} attacker updates and {out['honest-rejected']} honest ({wall:.0f} s)",
              flush=True)
    clean = got["fedavg", "none"]["map50"]
    lines.append(f"| strategy | {' | '.join(COLUMNS)} |")
    lines.append("| --- " * (len(COLUMNS) + 1) + "|")
    for strategy in dict.fromkeys(s for s, _ in arms):
        cells = [f"{got[strategy, a]['map50']:.3f} ({got[strategy, a]['map50'] / clean:.0%})"
                 if (strategy, a) in got else "–" for a in COLUMNS]
        lines.append(f"| {strategy} | {' | '.join(cells)} |")
    attacked = {k: v for k, v in got.items() if k[1] in ("signflip", "noise")}
    worst = {s: min(v["map50"] for (s2, _), v in attacked.items() if s2 == s) for s, _ in attacked}
    robust = {s: m for s, m in worst.items() if s != "fedavg"}
    best = max(robust, key=robust.get) if robust else "fedavg"
    held = [f"best robust strategy under attack: {best}, {worst[best] / clean:.0%} of clean FedAvg (goal 95 %)"]
    for attack, what in (("scale", "x10 updates"), ("malformed", "malformed replies")):
        if got_ := got.get(("fedavg", attack)):
            held.append(f"{what} rejected: {got_['attackers-rejected']} of {got_['attacker-updates']} "
                        f"(e.g. '{got_['reason']}'), honest ones rejected: {got_['honest-rejected']}")
    figures = f"clean FedAvg {clean:.3f}; worst under attack per strategy: " + ", ".join(
        f"{s} {m:.3f}" for s, m in worst.items())
    row = ("2 attackers (simulation)",
           f"{attackers} of {cameras} cameras send sign-flipped, noise, x10 or malformed updates, {rounds} rounds, "
           f"{len(arms)} runs", "; ".join(held), figures)
    return [row], lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scenario", default=str(SCENARIO))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cameras", type=int, default=10)
    ap.add_argument("--out", default="runs/drills_attack")
    args = ap.parse_args()
    print(f"instruction sets: {isa_summary()}", flush=True)
    rows, lines = drill_attacks(Path(args.out), Path(args.scenario), args.rounds, args.cameras)
    rows.insert(0, drill_crash(Path(args.out), Path(args.scenario), args.rounds, args.cameras))
    print(f"\nfinal mean per-camera val mAP50 of the global model (share of clean FedAvg), {args.rounds} rounds")
    print("\n".join(lines))
    print("\n| drill | what was done | what held | figures |\n| --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
