"""Hardware ports (buttons, indicator, camera, modem) with real and fake adapters."""
