"""Serving many ESFT adapters from one base model: the adapters' expert rows beside the base, any mix
of adapters in one batch."""
