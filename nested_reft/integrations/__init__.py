"""Nested-ReFT inside other training libraries (`nested_reft.integrations.trl`: TRL's GRPOTrainer)."""
