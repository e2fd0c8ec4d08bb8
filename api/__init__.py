"""HTTP API: suggestions for storefronts, an event collector for apps (docs/api.md)."""
