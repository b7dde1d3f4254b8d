# epx_cc_library(NAME SRCS ... [HDRS ...] [DEPS ...] [PUBLIC_DEPS ...])
# Makes the static library epx_<NAME> and the alias epx::<NAME>.
function(epx_cc_library)
  cmake_parse_arguments(ARG "" "NAME" "SRCS;HDRS;DEPS" ${ARGN})
  set(target epx_${ARG_NAME})
  add_library(${target} STATIC ${ARG_SRCS} ${ARG_HDRS})
  add_library(epx::${ARG_NAME} ALIAS ${target})
  target_link_libraries(${target} PUBLIC ${ARG_DEPS})
  set_target_properties(${target} PROPERTIES POSITION_INDEPENDENT_CODE ON)
endfunction()

# epx_cc_test(NAME SRCS ... DEPS ... [LABELS unit|mpi|gpu] [TIMEOUT s])
# One GoogleTest binary; each TEST becomes a ctest entry carrying the labels.
function(epx_cc_test)
  cmake_parse_arguments(ARG "" "NAME;TIMEOUT" "SRCS;DEPS;LABELS" ${ARGN})
  if(NOT ARG_LABELS)
    set(ARG_LABELS unit)
  endif()
  if(NOT ARG_TIMEOUT)
    set(ARG_TIMEOUT 300)
  endif()
  add_executable(${ARG_NAME} ${ARG_SRCS})
  target_link_libraries(${ARG_NAME} PRIVATE ${ARG_DEPS} GTest::gtest GTest::gtest_main GTest::gmock)
  target_compile_definitions(${ARG_NAME} PRIVATE
    EPX_TEST_DATA_DIR="${PROJECT_SOURCE_DIR}/tests/data"
    EPX_BINARY_DIR="${PROJECT_BINARY_DIR}")
  # mpirun jobs oversubscribe the cores and find their processes by name: one at a time.
  set(serial FALSE)
  if("mpi" IN_LIST ARG_LABELS)
    set(serial TRUE)
  endif()
  gtest_discover_tests(${ARG_NAME}
    PROPERTIES LABELS "${ARG_LABELS}" TIMEOUT ${ARG_TIMEOUT} RUN_SERIAL ${serial}
    DISCOVERY_TIMEOUT 60)
endfunction()
