"""The Backend's parts, one concern each: config documents, catalog cache, answers, stream."""
