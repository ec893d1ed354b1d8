# CMake toolchain file: cross-compile for 64-bit ARM Linux with Debian/Ubuntu's
# g++-aarch64-linux-gnu; sparsec_add_model then compiles models for sparsec's aarch64 target.
# With qemu-user installed, ctest runs the tests under qemu-aarch64.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(SPARSEC_TARGET aarch64 CACHE STRING "sparsec target of sparsec_add_model")
find_program(SPARSEC_QEMU_AARCH64 qemu-aarch64)
if(SPARSEC_QEMU_AARCH64)
  set(CMAKE_CROSSCOMPILING_EMULATOR "${SPARSEC_QEMU_AARCH64};-L;/usr/aarch64-linux-gnu")
endif()
