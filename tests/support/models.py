from navcache.demo.backbones import TinyVPR, export_models, make_model

__all__ = ["TinyVPR", "export_models", "make_model"]
