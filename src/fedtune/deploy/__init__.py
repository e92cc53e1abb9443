"""A deployment's two processes, each a thin shell around the round engine: `server` (`fedtune server`,
the coordinator) and `site` (`fedtune client`, one site's process)."""
