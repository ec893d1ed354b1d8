"""The TVM device tags sparsec compiles for, as data: `sparsec targets` lists them without
importing TVM (seconds). Generated from apache-tvm 0.27's tag registry
(``sparsec.targets.device_tags()``: aarch64 CPUs, x86 CPUs and NVIDIA GPUs from sm_75 on);
tests/test_targets.py checks it against the installed TVM, so it cannot drift unnoticed.
"""

#: CPU tags (aarch64 boards, x86 instances)
CPU_TAGS = ('arm/rasp4b64', 'arm/rk3399', 'arm/thunderx', 'arm/ultra96', 'aws/cpu/c5.12xlarge',
            'aws/cpu/c5.18xlarge', 'aws/cpu/c5.24xlarge', 'aws/cpu/c5.2xlarge',
            'aws/cpu/c5.4xlarge', 'aws/cpu/c5.9xlarge', 'aws/cpu/c5.large',
            'aws/cpu/c5.xlarge', 'raspberry-pi/4b-aarch64')
#: NVIDIA GPU tags
GPU_TAGS = ('nvidia/geforce-rtx-2060', 'nvidia/geforce-rtx-2070', 'nvidia/geforce-rtx-2080',
            'nvidia/geforce-rtx-2080-ti', 'nvidia/geforce-rtx-3060',
            'nvidia/geforce-rtx-3070', 'nvidia/geforce-rtx-3070-ti',
            'nvidia/geforce-rtx-3080', 'nvidia/geforce-rtx-3080-ti',
            'nvidia/geforce-rtx-3090', 'nvidia/geforce-rtx-3090-ti',
            'nvidia/geforce-rtx-4090', 'nvidia/geforce-rtx-5060-ti',
            'nvidia/jetson-agx-orin-32gb', 'nvidia/jetson-agx-orin-64gb',
            'nvidia/jetson-agx-thor', 'nvidia/jetson-orin-nano',
            'nvidia/nvidia-a10', 'nvidia/nvidia-a100', 'nvidia/nvidia-a10g',
            'nvidia/nvidia-a16', 'nvidia/nvidia-a2', 'nvidia/nvidia-a30',
            'nvidia/nvidia-a40', 'nvidia/nvidia-b100', 'nvidia/nvidia-h100',
            'nvidia/nvidia-t4', 'nvidia/nvidia-titan-rtx', 'nvidia/quadro-rtx-4000',
            'nvidia/quadro-rtx-5000', 'nvidia/quadro-rtx-6000',
            'nvidia/quadro-rtx-8000', 'nvidia/rtx-3000', 'nvidia/rtx-4000',
            'nvidia/rtx-5000', 'nvidia/rtx-a6000', 'nvidia/t1000', 'nvidia/t2000')
