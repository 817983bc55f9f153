"""cffi (API mode) bindings to libslirp, compiled when the plugin is installed.

API mode, like the core's KVM bindings: the compiler checks every struct
layout and prototype here against Debian's <slirp/libslirp.h>, and slirp's
callbacks are ``extern "Python"`` functions (static C trampolines, no
run-time generated closures).  ``setup.py`` builds this only when the header
is installed (package libslirp-dev); without it the plugin still installs
and ``backend = "user"`` reports that libslirp is missing.

The structures list only the fields kvmkit sets (``...;`` lets the compiler
fill in the rest); ``SlirpConfig.version`` 4 is the newest libslirp 4.7 knows.
"""
from cffi import FFI

CDEF = """
typedef struct Slirp Slirp;
typedef int... ssize_t;

struct in_addr { uint32_t s_addr; };

static const int SLIRP_POLL_IN;
static const int SLIRP_POLL_OUT;
static const int SLIRP_POLL_PRI;
static const int SLIRP_POLL_ERR;
static const int SLIRP_POLL_HUP;

typedef ssize_t (*SlirpWriteCb)(const void *buf, size_t len, void *opaque);
typedef void (*SlirpTimerCb)(void *opaque);
typedef int (*SlirpAddPollCb)(int fd, int events, void *opaque);
typedef int (*SlirpGetREventsCb)(int idx, void *opaque);

typedef enum SlirpTimerId { SLIRP_TIMER_RA, ... } SlirpTimerId;

typedef struct SlirpCb {
    SlirpWriteCb send_packet;
    void (*guest_error)(const char *msg, void *opaque);
    int64_t (*clock_get_ns)(void *opaque);
    void *(*timer_new)(SlirpTimerCb cb, void *cb_opaque, void *opaque);
    void (*timer_free)(void *timer, void *opaque);
    void (*timer_mod)(void *timer, int64_t expire_time, void *opaque);
    void (*register_poll_fd)(int fd, void *opaque);
    void (*unregister_poll_fd)(int fd, void *opaque);
    void (*notify)(void *opaque);
    void (*init_completed)(Slirp *slirp, void *opaque);
    void *(*timer_new_opaque)(SlirpTimerId id, void *cb_opaque, void *opaque);
    ...;
} SlirpCb;

#define SLIRP_CONFIG_VERSION_MAX ...

typedef struct SlirpConfig {
    uint32_t version;
    int restricted;
    bool in_enabled;
    struct in_addr vnetwork;
    struct in_addr vnetmask;
    struct in_addr vhost;
    bool in6_enabled;
    const char *vhostname;
    struct in_addr vdhcp_start;
    struct in_addr vnameserver;
    size_t if_mtu;
    size_t if_mru;
    bool disable_host_loopback;
    bool enable_emu;
    bool disable_dns;
    bool disable_dhcp;
    ...;
} SlirpConfig;

Slirp *slirp_new(const SlirpConfig *cfg, const SlirpCb *callbacks, void *opaque);
void slirp_cleanup(Slirp *slirp);
void slirp_pollfds_fill(Slirp *slirp, uint32_t *timeout, SlirpAddPollCb add_poll, void *opaque);
void slirp_pollfds_poll(Slirp *slirp, int select_error, SlirpGetREventsCb get_revents,
                        void *opaque);
void slirp_input(Slirp *slirp, const uint8_t *pkt, int pkt_len);
void slirp_handle_timer(Slirp *slirp, SlirpTimerId id, void *cb_opaque);
int slirp_add_hostfwd(Slirp *slirp, int is_udp, struct in_addr host_addr, int host_port,
                      struct in_addr guest_addr, int guest_port);
int slirp_remove_hostfwd(Slirp *slirp, int is_udp, struct in_addr host_addr, int host_port);
char *slirp_connection_info(Slirp *slirp);
const char *slirp_version_string(void);
void free(void *ptr);

extern "Python" ssize_t kvmkit_slirp_send_packet(const void *, size_t, void *);
extern "Python" void kvmkit_slirp_guest_error(const char *, void *);
extern "Python" int64_t kvmkit_slirp_clock_get_ns(void *);
extern "Python" void *kvmkit_slirp_timer_new(SlirpTimerCb, void *, void *);
extern "Python" void kvmkit_slirp_timer_free(void *, void *);
extern "Python" void kvmkit_slirp_timer_mod(void *, int64_t, void *);
extern "Python" void kvmkit_slirp_register_poll_fd(int, void *);
extern "Python" void kvmkit_slirp_unregister_poll_fd(int, void *);
extern "Python" void kvmkit_slirp_notify(void *);
extern "Python" void *kvmkit_slirp_timer_new_opaque(SlirpTimerId, void *, void *);
extern "Python" int kvmkit_slirp_add_poll(int, int, void *);
extern "Python" int kvmkit_slirp_get_revents(int, void *);
"""

SOURCE = """
#include <stdlib.h>
#include <slirp/libslirp.h>
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("kvmkit_virtio_net._slirp", SOURCE, libraries=["slirp"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
