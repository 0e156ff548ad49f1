"""SmartMoE's offline stage: measure the machine (profile.py), model a layout's memory (memory.py) and time, search
layouts."""
