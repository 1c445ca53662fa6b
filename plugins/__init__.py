"""Built-in dabench method plugins, each written exactly as a third-party plugin would be."""
