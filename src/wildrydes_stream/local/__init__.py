"""Running everything on one machine: emulators, a simulated unicorn fleet, the `local` command."""
