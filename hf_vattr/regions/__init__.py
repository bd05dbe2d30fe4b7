"""Region unitization: partition each image's visual tokens into K regions."""

from .map import PromptRegions, RegionMap, grid_regions, prompt_regions

__all__ = ["RegionMap", "PromptRegions", "grid_regions", "prompt_regions"]
