"""macOS command outputs, written down from the documented formats, and tree builders."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

SYSCTL_BRAND = "Apple M3 Max\n"
SYSCTL_PHYSICALCPU = "16\n"

IOREG_AGX = """\
+-o AGXAcceleratorG15X  <class AGXAcceleratorG15X, id 0x100000353, registered, matched, active, busy 0 (0 ms), retain 41>
    {
      "IOClass" = "AGXAcceleratorG15X"
      "gpu-core-count" = 40
      "PerformanceStatistics" = {"In use system memory (driver)"=0,"Alloc system memory"=4228186112,"Tiler Utilization %"=12,"recoveryCount"=0,"lastRecoveryTime"=0,"Renderer Utilization %"=30,"TiledSceneBytes"=1572864,"Device Utilization %"=31,"SplitSceneCount"=0,"Allocated PB Size"=76021760,"In use system memory"=1453391872}
      "AGXParameterBufferMaxSize" = 1610612736
    }
"""  # noqa: E501

SYSTEM_PROFILER_DISPLAYS = """\
{
  "SPDisplaysDataType" : [
    {
      "_name" : "Apple M2 Pro",
      "spdisplays_mtlgpufamilysupport" : "spdisplays_metal3",
      "sppci_bus" : "spdisplays_builtin",
      "sppci_cores" : "19",
      "sppci_device_type" : "spdisplays_gpu",
      "sppci_model" : "Apple M2 Pro",
      "sppci_vendor" : "sppci_vendor_Apple"
    }
  ]
}
"""

PMSET_BATT_AC = """\
Now drawing from 'AC Power'
 -InternalBattery-0 (id=4653155)\t100%; charged; 0:00 remaining present: true
"""
PMSET_BATT_BATTERY = """\
Now drawing from 'Battery Power'
 -InternalBattery-0 (id=4653155)\t87%; discharging; 5:12 remaining present: true
"""
PMSET_BATT_DESKTOP = "Now drawing from 'AC Power'\n"
PMSET_BATT_UPS = "Now drawing from 'UPS Power'\n -CP1500 (id=1)\t90%; discharging\n"

PMSET_THERM_NOMINAL = """\
Note: No thermal warning level has been recorded
Note: No performance warning level has been recorded
Note: No CPU power status has been recorded
"""
PMSET_THERM_SPEED_LIMITED = """\
Note: No thermal warning level has been recorded
Note: No performance warning level has been recorded
2024-06-01 10:00:00 +0200 CPU Power notify
\tCPU_Scheduler_Limit \t= 100
\tCPU_Available_CPUs \t= 8
\tCPU_Speed_Limit \t= 70
"""
PMSET_THERM_CRISIS = """\
Thermal warning level set to 10.
Note: No performance warning level has been recorded
"""

PSI_IDLE = """\
some avg10=0.00 avg60=0.00 avg300=0.00 total=0
full avg10=0.00 avg60=0.00 avg300=0.00 total=0
"""
PSI_CRITICAL = """\
some avg10=62.15 avg60=40.02 avg300=12.00 total=91234567
full avg10=31.40 avg60=20.11 avg300=5.00 total=45678901
"""

CPUINFO_X86 = """\
processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC 7B13 64-Core Processor
physical id\t: 0
core id\t\t: 0

processor\t: 1
vendor_id\t: AuthenticAMD
model\t\t: 1
model name\t: AMD EPYC 7B13 64-Core Processor
physical id\t: 0
core id\t\t: 0

processor\t: 2
model name\t: AMD EPYC 7B13 64-Core Processor
physical id\t: 0
core id\t\t: 1

processor\t: 3
model name\t: AMD EPYC 7B13 64-Core Processor
physical id\t: 0
core id\t\t: 1
"""
CPUINFO_ARM = """\
processor\t: 0
BogoMIPS\t: 50.00
CPU implementer\t: 0x41

processor\t: 1
BogoMIPS\t: 50.00
CPU implementer\t: 0x41
"""


def runner(outputs: Mapping[str, str | None]) -> tuple[list[tuple[str, ...]], object]:
    """A command runner answering from ``outputs`` (keyed by the joined argv).

    Returns the list of calls it records and the runner; unknown commands
    answer ``None`` (missing, failed or timed out).
    """
    calls: list[tuple[str, ...]] = []

    def run(argv: Sequence[str], timeout: float) -> str | None:
        assert timeout > 0  # every command is bounded
        calls.append(tuple(argv))
        return outputs.get(" ".join(argv))

    return calls, run


def write_tree(root: Path, files: Mapping[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def darwin_outputs(over: Mapping[str, str | None] | None = None) -> dict[str, str | None]:
    """A Mac's answers (M3 Max, on AC, nominal, normal pressure), ``over`` replacing some."""
    base: dict[str, str | None] = {
        "sysctl -n machdep.cpu.brand_string": SYSCTL_BRAND,
        "sysctl -n hw.physicalcpu": SYSCTL_PHYSICALCPU,
        "sysctl -n kern.memorystatus_vm_pressure_level": "1\n",
        "ioreg -r -d 1 -w 0 -c AGXAccelerator": IOREG_AGX,
        "system_profiler SPDisplaysDataType -json": SYSTEM_PROFILER_DISPLAYS,
        "pmset -g batt": PMSET_BATT_AC,
        "pmset -g therm": PMSET_THERM_NOMINAL,
    }
    base.update(over or {})
    return base
