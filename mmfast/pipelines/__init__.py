"""Task pipelines (registered in :data:`mmfast.api.TASKS`)."""
