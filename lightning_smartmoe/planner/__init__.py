"""SmartMoE's offline stage: measure the machine, model a layout's memory and time, search layouts."""
