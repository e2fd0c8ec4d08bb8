"""Pure recommendation logic: no I/O, used by the stream workers and the offline replay."""

from models.config import ModelConfig
from models.context import ContextBook, ShopperContext
from models.graph import ItemGraph
from models.recommender import CrossSellRecommender

__all__ = ["ContextBook", "CrossSellRecommender", "ItemGraph", "ModelConfig", "ShopperContext"]
