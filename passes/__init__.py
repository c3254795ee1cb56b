"""Passes: pure functions over plans (Plan -> Plan, or Plan -> report). Import ir only."""
from .check import Report, check, rendezvous_cycle, rendezvous_problem, require_valid
from .exchange import redistribute
from .grad_reduce import place_grad_reduce
from .lower import lower_comm, p2p_tag
from .replay import Replay, replay
from .simulate import bubble_fraction, peak_units, simulate_timed, simulate_units
from .validate import Problem, executor_problems, spec_problems, validate

__all__ = ["Report", "check", "rendezvous_cycle", "rendezvous_problem", "require_valid", "lower_comm", "p2p_tag", "Replay", "replay", "bubble_fraction", "peak_units",
           "simulate_units", "simulate_timed", "Problem", "executor_problems", "spec_problems", "validate", "redistribute",
           "place_grad_reduce"]
