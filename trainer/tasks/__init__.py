"""Built-in environments with verifiable rewards, sized for the tiny local model."""
