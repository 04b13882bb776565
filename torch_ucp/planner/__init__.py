"""DCP planners: DTensor placements to atomic fragments (save) and fragments to reads (load)."""

from torch_ucp.planner.load_planner import UCPLoadPlanner
from torch_ucp.planner.save_planner import UCPSavePlanner

__all__ = ["UCPLoadPlanner", "UCPSavePlanner"]
