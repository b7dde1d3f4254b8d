// The mpirun command line the mpi tests launch with (EPX_MPIRUN: the launcher CMake found).
#ifndef EPX_TESTS_MPI_MPIRUN_H_
#define EPX_TESTS_MPI_MPIRUN_H_

#include <unistd.h>

#include <string>

namespace epx::testing {

// mpirun with what a CI container needs: oversubscription of 2 cores, root allowed, one OpenMP
// thread per rank, and no cross-memory-attach copies (containers often forbid ptrace). Ends
// with a space.
inline std::string Mpirun(int np) {
  std::string cmd = std::string(EPX_MPIRUN) +
                    " --oversubscribe -x OMP_NUM_THREADS=1 --mca btl_vader_single_copy_mechanism none";
  if (geteuid() == 0) cmd += " --allow-run-as-root";
  return cmd + " -np " + std::to_string(np) + " ";
}

}  // namespace epx::testing

#endif  // EPX_TESTS_MPI_MPIRUN_H_
