"""What the CLI shows while a federated run goes on: the rounds table and the current stage with its progress."""

from __future__ import annotations

from rich.console import Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text


def rounds_table(events: list[dict]) -> Table:
    table = Table(title="federated rounds")
    for col in ("round", "sampled", "accepted", "failed", "client loss", "mAP50", "mAP50-95", "seconds"):
        table.add_column(col, justify="right")
    train = {e["round"]: e["data"] for e in events if e["kind"] == "train_result"}
    for e in events:
        if e["kind"] != "round_end":
            continue
        t, c = train.get(e["round"], {}), e["data"].get("central", {})
        clients = t.get("clients", [])
        loss = t.get("metrics", {}).get("loss")
        table.add_row(str(e["round"]), str(len(clients)), str(t.get("accepted", "-")),
                      str(sum(not x["ok"] for x in clients)), f"{loss:.3f}" if loss is not None else "-",
                      *(f"{c[k]:.3f}" if k in c else "-" for k in ("map50", "map")), f"{t.get('seconds', 0):.1f}")
    return table


def stage_line(events: list[dict], rounds: int, now: float) -> Table | Text:
    """The stage the run is in (a round, or a snapshot step with a bar and the time left), from its events."""
    if not events:
        return Text("starting the Simulation Engine (Ray, the cameras' ClientApps)", style="dim")
    last = events[-1]
    if last["kind"] == "snapshot_progress":
        d = last["data"]
        first = next(e for e in events if e["kind"] == "snapshot_progress" and e["data"]["stage"] == d["stage"])
        done, total, begun = d["done"], max(d["total"], 1), first["time"]
        rate = (done - first["data"]["done"]) / max(last["time"] - begun, 1e-6)
        left = f"{(total - done) / rate:.0f} s left" if rate > 0 and done < total else ""
        grid = Table.grid(padding=(0, 1))
        grid.add_row(Text(f"snapshot of round {last['round']}: {d['stage']}", style="bold"),
                     ProgressBar(total=total, completed=done, width=30) if total > 1 else Text(""),
                     Text(f"{done}/{total}" if total > 1 else ""), Text(left), Text(f"{now - begun:.0f} s"))
        return grid
    if last["kind"] in ("round_start", "train_result"):
        return Text(f"round {last['round']}/{rounds}: cameras fine-tuning and scoring ({now - last['time']:.0f} s)",
                    style="bold")
    if last["kind"] == "round_end":
        return Text(f"round {last['round']}/{rounds} done", style="bold")
    return Text(last["kind"].replace("_", " "), style="bold")


def live_view(events: list[dict], rounds: int, now: float) -> Group:
    return Group(rounds_table(events), stage_line(events, rounds, now))
