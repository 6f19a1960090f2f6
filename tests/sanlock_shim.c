/* Test helper only: lets a sanlock daemon start in a container without CAP_SYS_RESOURCE.
 * sanlock raises its memlock limit at start and exits when that fails with EPERM ("cannot set
 * the limits for memlock"); this LD_PRELOAD shim turns that EPERM into success. Production
 * hosts run the distribution's sanlock service unchanged (DESIGN.md, "Real parts"). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <sys/resource.h>
int setrlimit(__rlimit_resource_t r, const struct rlimit *l) {
    int (*real)(__rlimit_resource_t, const struct rlimit *) = dlsym(RTLD_NEXT, "setrlimit");
    int rc = real(r, l);
    if (rc != 0 && errno == EPERM) { errno = 0; return 0; }
    return rc;
}
