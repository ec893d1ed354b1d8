# find_package(sparsec X.Y): the installed sparsec satisfies X.Y when it is X.Y or newer
# with the same major version.
find_program(SPARSEC_EXECUTABLE sparsec DOC "the sparsec command")
set(PACKAGE_VERSION "0")
if(SPARSEC_EXECUTABLE)
  execute_process(COMMAND "${SPARSEC_EXECUTABLE}" --version OUTPUT_VARIABLE _v
                  OUTPUT_STRIP_TRAILING_WHITESPACE)
  string(REGEX REPLACE "^sparsec " "" PACKAGE_VERSION "${_v}")
endif()
set(PACKAGE_VERSION_COMPATIBLE FALSE)
if(NOT PACKAGE_VERSION VERSION_LESS PACKAGE_FIND_VERSION)
  string(REGEX MATCH "^[0-9]+" _have_major "${PACKAGE_VERSION}")
  if(_have_major STREQUAL "${PACKAGE_FIND_VERSION_MAJOR}" OR NOT PACKAGE_FIND_VERSION)
    set(PACKAGE_VERSION_COMPATIBLE TRUE)
  endif()
endif()
if(PACKAGE_VERSION VERSION_EQUAL PACKAGE_FIND_VERSION)
  set(PACKAGE_VERSION_EXACT TRUE)
endif()
