"""Shared building blocks: embedding, interaction, head, fusion."""
