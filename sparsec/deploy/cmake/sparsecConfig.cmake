# find_package(sparsec) support: compile models with sparsec as a build step and link them.
#
#   find_package(sparsec REQUIRED)        # -Dsparsec_DIR=$(sparsec cmake-dir)
#   sparsec_add_model(digits SRC model.onnx [TARGET host|aarch64|...] [RATIO 0.3]
#                     [CALIB calib.npz] [OPTIONS --reconstruct ...])
#   target_link_libraries(app PRIVATE digits)   # then #include "digits.h"
#   sparsec_install(app DESTINATION bin)        # app + lib/ (the TVM runtime), relocatable
#
# sparsec_add_model runs `sparsec compile` at build time into ${CMAKE_CURRENT_BINARY_DIR}/NAME
# (sets NAME_PACKAGE_DIR), again whenever the model, the calibration data, the flags or the
# sparsec version change. Its target NAME links the model's static archive (whole-archive: the
# archive registers itself with the TVM runtime at load), the C API and the TVM runtime.
#
# The TVM runtime comes from `sparsec runtime --target T`, run at configure time into the build
# tree (or set SPARSEC_RUNTIME_DIR_<T> to one made earlier, e.g. for offline builds; <T> is the
# target as a C identifier: aarch64, raspberry_pi_4b_aarch64, ...). For a
# cross build use a toolchain file: sparsec ships aarch64-linux-gnu.cmake next to this file.
include_guard(GLOBAL)
cmake_minimum_required(VERSION 3.24)  # $<LINK_LIBRARY:WHOLE_ARCHIVE,...>

# the C API is C++ (over the TVM runtime): a C-only project gets C++ enabled for it, and CMake
# then links its programs with the C++ driver
get_property(_sparsec_languages GLOBAL PROPERTY ENABLED_LANGUAGES)
if(NOT "CXX" IN_LIST _sparsec_languages)
  enable_language(CXX)
endif()

find_program(SPARSEC_EXECUTABLE sparsec DOC "the sparsec command")
if(NOT SPARSEC_EXECUTABLE)
  message(FATAL_ERROR "sparsec: the `sparsec` command was not found: put it on PATH or set "
                      "SPARSEC_EXECUTABLE")
endif()
execute_process(COMMAND "${SPARSEC_EXECUTABLE}" --version OUTPUT_VARIABLE _sparsec_version
                OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _sparsec_rc)
if(NOT _sparsec_rc EQUAL 0)
  message(FATAL_ERROR "sparsec: `${SPARSEC_EXECUTABLE} --version` failed")
endif()
string(REGEX REPLACE "^sparsec " "" sparsec_VERSION "${_sparsec_version}")

if(CMAKE_SYSTEM_PROCESSOR MATCHES "^(aarch64|arm64|ARM64)$")
  set(_sparsec_default_target aarch64)
else()
  set(_sparsec_default_target host)
endif()
set(SPARSEC_TARGET "${_sparsec_default_target}" CACHE STRING
    "sparsec target of sparsec_add_model (default: from the compiler's processor)")

# the TVM runtime for `target` as the targets sparsec_tvm_<target> (imported shared libraries)
# and sparsec_capi_<target> (the C API, compiled here for the target)
function(_sparsec_runtime target)
  string(MAKE_C_IDENTIFIER "${target}" tid)
  if(TARGET sparsec_capi_${tid})
    return()
  endif()
  set(dir "${SPARSEC_RUNTIME_DIR_${tid}}")
  if(NOT dir)
    set(dir "${CMAKE_BINARY_DIR}/sparsec-runtime-${tid}")
    if(NOT EXISTS "${dir}/runtime.json")
      message(STATUS "sparsec: TVM runtime for ${target} -> ${dir}")
      execute_process(COMMAND "${SPARSEC_EXECUTABLE}" -q runtime --target "${target}" -o "${dir}"
                      RESULT_VARIABLE rc ERROR_VARIABLE err)
      if(NOT rc EQUAL 0)
        string(STRIP "${err}" err)
        message(FATAL_ERROR "sparsec: cannot make the TVM runtime for ${target}: ${err}")
      endif()
    endif()
  endif()
  add_library(sparsec_tvm_ffi_${tid} SHARED IMPORTED GLOBAL)
  set_target_properties(sparsec_tvm_ffi_${tid} PROPERTIES
    IMPORTED_LOCATION "${dir}/lib/libtvm_ffi.so" IMPORTED_NO_SONAME TRUE)
  add_library(sparsec_tvm_${tid} SHARED IMPORTED GLOBAL)
  set_target_properties(sparsec_tvm_${tid} PROPERTIES
    IMPORTED_LOCATION "${dir}/lib/libtvm_runtime.so" IMPORTED_NO_SONAME TRUE
    INTERFACE_LINK_LIBRARIES sparsec_tvm_ffi_${tid})
  set_property(GLOBAL APPEND PROPERTY SPARSEC_RUNTIME_LIBRARIES
               "${dir}/lib/libtvm_runtime.so" "${dir}/lib/libtvm_ffi.so")
  add_library(sparsec_capi_${tid} STATIC "${dir}/src/sparsec_runtime.cc")
  target_include_directories(sparsec_capi_${tid} PUBLIC "${dir}/include")
  target_compile_features(sparsec_capi_${tid} PUBLIC cxx_std_17)
  set_target_properties(sparsec_capi_${tid} PROPERTIES POSITION_INDEPENDENT_CODE ON)
  target_link_libraries(sparsec_capi_${tid} PUBLIC sparsec_tvm_${tid} ${CMAKE_DL_LIBS})
endfunction()

function(sparsec_add_model name)
  cmake_parse_arguments(PARSE_ARGV 1 arg "" "SRC;TARGET;RATIO;CALIB" "OPTIONS")
  if(NOT arg_SRC)
    message(FATAL_ERROR "sparsec_add_model(${name}): SRC model.onnx is required")
  endif()
  if(NOT name MATCHES "^[A-Za-z_][A-Za-z0-9_]*$")
    message(FATAL_ERROR "sparsec_add_model(${name}): the name must be a C identifier")
  endif()
  set(target "${SPARSEC_TARGET}")
  if(arg_TARGET)
    set(target "${arg_TARGET}")
  endif()
  # sparsec's native targets run here; every other one (aarch64, arm-neon, device tags such
  # as raspberry-pi/4b-aarch64) is a 64-bit ARM and needs an aarch64 compiler
  if(target MATCHES "^(host|x86-avx2|llvm)$")
    if(CMAKE_CROSSCOMPILING)
      message(FATAL_ERROR "sparsec_add_model(${name}): target ${target} is this machine, but "
                          "the compiler is a cross compiler: set TARGET or SPARSEC_TARGET")
    endif()
  elseif(NOT CMAKE_SYSTEM_PROCESSOR MATCHES "^(aarch64|arm64)$")
    message(FATAL_ERROR "sparsec_add_model(${name}): target ${target} needs an aarch64 "
                        "compiler: configure with -DCMAKE_TOOLCHAIN_FILE=${CMAKE_CURRENT_FUNCTION_LIST_DIR}/aarch64-linux-gnu.cmake")
  endif()
  get_filename_component(src "${arg_SRC}" ABSOLUTE)
  set(out "${CMAKE_CURRENT_BINARY_DIR}/${name}")
  set(cmd "${SPARSEC_EXECUTABLE}" -q compile "${src}" --target "${target}" --name ${name} -o "${out}")
  set(depends "${src}")
  if(arg_RATIO)
    list(APPEND cmd --ratio ${arg_RATIO})
  endif()
  if(arg_CALIB)
    get_filename_component(calib "${arg_CALIB}" ABSOLUTE)
    list(APPEND cmd --calib "${calib}")
    list(APPEND depends "${calib}")
  endif()
  list(APPEND cmd ${arg_OPTIONS})
  # written only when its content changes: a new flag or sparsec version re-runs the compile
  set(stamp "${CMAKE_CURRENT_BINARY_DIR}/${name}.sparsec-command")
  string(REPLACE ";" " " cmd_text "${cmd}")
  file(CONFIGURE OUTPUT "${stamp}" CONTENT "sparsec ${sparsec_VERSION}\n${cmd_text}\n")
  set(outputs "${out}/manifest.json" "${out}/lib${name}.a" "${out}/${name}.h")
  # CMake deletes an output of a custom command whose command line changed, which leaves a
  # directory sparsec will not overwrite: start from an empty one
  add_custom_command(OUTPUT ${outputs} COMMAND "${CMAKE_COMMAND}" -E rm -rf "${out}"
                     COMMAND ${cmd} DEPENDS ${depends} "${stamp}"
                     COMMENT "sparsec: compiling ${name} for ${target}" VERBATIM)
  add_custom_target(${name}_sparsec_package DEPENDS ${outputs})

  _sparsec_runtime("${target}")
  string(MAKE_C_IDENTIFIER "${target}" tid)
  add_library(${name}_sparsec_archive STATIC IMPORTED GLOBAL)
  set_target_properties(${name}_sparsec_archive PROPERTIES IMPORTED_LOCATION "${out}/lib${name}.a")
  add_dependencies(${name}_sparsec_archive ${name}_sparsec_package)
  file(MAKE_DIRECTORY "${out}")
  add_library(${name} INTERFACE)
  target_include_directories(${name} INTERFACE "${out}")
  target_link_libraries(${name} INTERFACE
    "$<LINK_LIBRARY:WHOLE_ARCHIVE,${name}_sparsec_archive>" sparsec_capi_${tid})
  add_dependencies(${name} ${name}_sparsec_package)
  set(${name}_PACKAGE_DIR "${out}" PARENT_SCOPE)
endfunction()

# sparsec_install(app [DESTINATION bin]): install `app` with the TVM runtime it loads in lib/
# beside it, and a RUNPATH of $ORIGIN/lib, so the installed directory runs wherever it is copied
# (no LD_LIBRARY_PATH): cmake --install BUILD --prefix OUT; copy OUT/bin to the device.
function(sparsec_install app)
  cmake_parse_arguments(PARSE_ARGV 1 arg "" "DESTINATION" "")
  if(NOT arg_DESTINATION)
    set(arg_DESTINATION bin)
  endif()
  set_property(TARGET ${app} APPEND PROPERTY INSTALL_RPATH "$ORIGIN/lib")
  install(TARGETS ${app} RUNTIME DESTINATION "${arg_DESTINATION}")
  get_property(libs GLOBAL PROPERTY SPARSEC_RUNTIME_LIBRARIES)
  list(REMOVE_DUPLICATES libs)
  install(FILES ${libs} DESTINATION "${arg_DESTINATION}/lib")
endfunction()
