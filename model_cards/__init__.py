"""Model-card templates (installed as xlstm_hf.model_cards)."""
