"""Networks: the article's 2D U-Net and the registry that builds networks from a model spec."""

from medseg.networks.article_unet import ArticleUNet

__all__ = ["ArticleUNet"]
