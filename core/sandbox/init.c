/* kvmkit's guest init for `kvmkit sandbox` and host-root `kvmkit run`.
 *
 * The guest's root is the host's / over virtio-fs (read-only unless --rw).
 * This program, PID 1, mounts what a command needs, reads its job from the
 * virtio-console port "org.kvmkit.job", runs the command as the host user in
 * the host's working directory with stdin/stdout/stderr on their own ports
 * (or, interactively, on the console hvc0), reports how it ended on the port
 * "org.kvmkit.status", syncs and reboots (the host ends the VM on reboot).
 *
 * Job: NUL-terminated "key=value" records, in any order:
 *   uid=N gid=N groups=N,N,...   the identity the command runs with
 *   cwd=PATH                     its working directory
 *   arg=WORD (repeated)          argv; none: an interactive shell ($SHELL)
 *   env=K=V (repeated)           its environment
 *   tty=1                        run on /dev/hvc0 as a controlling terminal
 *   tmpfs=PATH (repeated)        an empty tmpfs over PATH
 *   rwdir=TAG:PATH (repeated)    mount the virtio-fs TAG read-write on PATH
 *   rodir=TAG:PATH (repeated)    mount the virtio-fs TAG read-only on PATH (a host
 *                                directory the guest's /tmp tmpfs would hide)
 *   overlay=PATH (repeated)      PATH writable, writes kept in guest memory
 *   hostname=NAME
 * Status: "exit N\n", "signal N\n" or "error TEXT\n".
 *
 * Every system call costs milliseconds on a nested host: keep them few.
 * Build: gcc -static -Os -o init init.c (kvmkit does it at first use).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_ITEMS 4096
#define JOB_LIMIT (1 << 20)

static int status_fd = -1;

static void say(const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	int n = snprintf(buf, sizeof buf, "kvmkit-init: ");
	va_start(ap, fmt);
	n += vsnprintf(buf + n, sizeof buf - n - 1, fmt, ap);
	va_end(ap);
	if (n > (int)sizeof buf - 2)
		n = sizeof buf - 2;
	buf[n++] = '\n';
	if (write(2, buf, n) < 0) { /* the console is gone: nothing to do */ }
}

static void report(const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	int n;
	va_start(ap, fmt);
	n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
	va_end(ap);
	if (n > (int)sizeof buf - 2)
		n = sizeof buf - 2;
	buf[n++] = '\n';
	if (status_fd >= 0 && write(status_fd, buf, n) < 0)
		say("cannot report the status: %s", strerror(errno));
}

static void finish(void)
{
	sync();
	reboot(RB_AUTOBOOT);
	for (;;)
		pause();
}

static void fail(const char *fmt, ...)
{
	char buf[400];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	say("%s", buf);
	report("error %s", buf);
	finish();
}

static void mount_or_fail(const char *src, const char *dst, const char *type,
			  unsigned long flags, const char *data)
{
	if (mount(src, dst, type, flags, data) < 0)
		fail("mount %s on %s (%s): %s", src, dst, type, strerror(errno));
}

/* /dev/vportXpY of the port named NAME, waiting for the name to arrive. */
static int ports_found(const char **names, char paths[][300], int n)
{
	DIR *d = opendir("/sys/class/virtio-ports");
	struct dirent *e;
	int found = 0;
	if (!d)
		return 0;
	while ((e = readdir(d))) {
		char p[300], name[256];
		int fd, len, i;
		if (e->d_name[0] == '.')
			continue;
		snprintf(p, sizeof p, "/sys/class/virtio-ports/%s/name", e->d_name);
		fd = open(p, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			continue;
		len = read(fd, name, sizeof name - 1);
		close(fd);
		if (len <= 0)
			continue;
		name[len] = 0;
		if (name[len - 1] == '\n')
			name[len - 1] = 0;
		for (i = 0; i < n; i++)
			if (!paths[i][0] && !strcmp(name, names[i])) {
				snprintf(paths[i], 300, "/dev/%s", e->d_name);
				found++;
			}
	}
	closedir(d);
	return found;
}

static void find_ports(const char **names, char paths[][300], int n)
{
	int found = 0, tries;
	struct timespec ts = {0, 20 * 1000 * 1000};
	for (tries = 0; tries < 1500; tries++) {          /* 30 s */
		found += ports_found(names, paths, n);
		if (found >= n)
			return;
		nanosleep(&ts, NULL);
	}
	for (int i = 0; i < n; i++)
		if (!paths[i][0])
			fail("no virtio-console port named %s (is the virtio-console device there?)",
			     names[i]);
}

static char *read_all(int fd, size_t *len)
{
	size_t cap = 65536, n = 0;
	char *buf = malloc(cap);
	for (;;) {
		ssize_t r;
		if (n == cap) {
			if (cap >= JOB_LIMIT)
				fail("the job is larger than %d bytes", JOB_LIMIT);
			cap *= 2;
			buf = realloc(buf, cap);
		}
		if (!buf)
			fail("out of memory reading the job");
		r = read(fd, buf + n, cap - n);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			fail("reading the job: %s", strerror(errno));
		if (r == 0)
			break;
		n += r;
	}
	*len = n;
	return buf;
}

static void mkdirs(const char *path)
{
	char tmp[4096];
	snprintf(tmp, sizeof tmp, "%s", path);
	for (char *p = tmp + 1; *p; p++)
		if (*p == '/') {
			*p = 0;
			mkdir(tmp, 0755);
			*p = '/';
		}
	mkdir(tmp, 0755);
}

static void overlay(const char *path, int index)
{
	char base[64], upper[96], work[96], opts[8400];
	mkdirs(path);
	snprintf(base, sizeof base, "/run/kvmkit/overlay%d", index);
	mkdirs(base);
	mount_or_fail("tmpfs", base, "tmpfs", 0, "mode=0755");
	snprintf(upper, sizeof upper, "%s/upper", base);
	snprintf(work, sizeof work, "%s/work", base);
	mkdir(upper, 0755);
	mkdir(work, 0755);
	snprintf(opts, sizeof opts, "lowerdir=%s,upperdir=%s,workdir=%s", path, upper, work);
	mount_or_fail("overlay", path, "overlay", 0, opts);
}

int main(void)
{
	static const char *names[] = {"org.kvmkit.job", "org.kvmkit.status", "org.kvmkit.stdin",
				      "org.kvmkit.stdout", "org.kvmkit.stderr"};
	static char paths[5][300];
	char *argv[MAX_ITEMS + 1], *envp[MAX_ITEMS + 1];
	gid_t groups[256];
	int argc = 0, envc = 0, ngroups = -1, tty = 0, overlays = 0;
	uid_t uid = 0;
	gid_t gid = 0;
	const char *cwd = "/";
	size_t len;
	char *job;
	int fd, wstatus;
	pid_t child;

	if (getpid() != 1) {
		fprintf(stderr, "kvmkit-init: this is a guest's init (PID 1), not a host program\n");
		return 2;
	}
	mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");  /* EBUSY: already there */
	mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
	mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	mount("tmpfs", "/var/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	mkdir("/dev/shm", 01777);
	mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	mkdir("/dev/pts", 0755);
	mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "ptmxmode=0666,mode=0620");

	find_ports(names, paths, 2);                       /* job and status first */
	status_fd = open(paths[1], O_WRONLY | O_CLOEXEC);
	if (status_fd < 0)
		fail("open %s (status port): %s", paths[1], strerror(errno));
	fd = open(paths[0], O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		fail("open %s (job port): %s", paths[0], strerror(errno));
	job = read_all(fd, &len);
	close(fd);

	for (size_t at = 0; at < len;) {
		char *rec = job + at, *val;
		size_t n = strnlen(rec, len - at);
		if (at + n == len)
			fail("the job's last record is not NUL-terminated");
		at += n + 1;
		val = strchr(rec, '=');
		if (!val)
			fail("job record without '=': %.60s", rec);
		*val++ = 0;
		if (!strcmp(rec, "arg") && argc < MAX_ITEMS)
			argv[argc++] = val;
		else if (!strcmp(rec, "env") && envc < MAX_ITEMS)
			envp[envc++] = val;
		else if (!strcmp(rec, "uid"))
			uid = strtoul(val, NULL, 10);
		else if (!strcmp(rec, "gid"))
			gid = strtoul(val, NULL, 10);
		else if (!strcmp(rec, "groups")) {
			ngroups = 0;
			for (char *p = val; *p && ngroups < 256; p = strchr(p, ',') ? strchr(p, ',') + 1 : "")
				groups[ngroups++] = strtoul(p, NULL, 10);
		} else if (!strcmp(rec, "cwd"))
			cwd = val;
		else if (!strcmp(rec, "tty"))
			tty = 1;
		else if (!strcmp(rec, "hostname"))
			sethostname(val, strlen(val));
		else if (!strcmp(rec, "tmpfs"))
			mount_or_fail("tmpfs", val, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
		else if (!strcmp(rec, "overlay"))
			overlay(val, overlays++);
		else if (!strcmp(rec, "rwdir") || !strcmp(rec, "rodir")) {
			char *path = strchr(val, ':');
			if (!path)
				fail("%s record without TAG:PATH: %.60s", rec, val);
			*path++ = 0;
			mkdirs(path);                      /* under a guest tmpfs it is not there yet */
			mount_or_fail(val, path, "virtiofs", rec[1] == 'o' ? MS_RDONLY : 0, NULL);
		} else
			fail("unknown job record %.60s", rec);
	}
	argv[argc] = NULL;
	envp[envc] = NULL;

	if (!tty)
		find_ports(names + 2, paths + 2, 3);
	child = fork();
	if (child < 0)
		fail("fork: %s", strerror(errno));
	if (child == 0) {
		if (tty) {
			setsid();
			fd = open("/dev/hvc0", O_RDWR);
			if (fd < 0)
				fd = open("/dev/console", O_RDWR);
			if (fd >= 0)
				ioctl(fd, TIOCSCTTY, 1);
		} else {
			fd = open(paths[2], O_RDONLY);
			if (fd < 0 || dup2(fd, 0) < 0)
				fail("stdin port %s: %s", paths[2], strerror(errno));
			fd = open(paths[3], O_WRONLY);
			if (fd < 0 || dup2(fd, 1) < 0)
				fail("stdout port %s: %s", paths[3], strerror(errno));
			fd = open(paths[4], O_WRONLY);
			if (fd < 0 || dup2(fd, 2) < 0)
				fail("stderr port %s: %s", paths[4], strerror(errno));
			fd = -1;
		}
		if (fd >= 0) {
			dup2(fd, 0);
			dup2(fd, 1);
			dup2(fd, 2);
			if (fd > 2)
				close(fd);
		}
		if ((ngroups >= 0 && setgroups(ngroups, groups) < 0) || setgid(gid) < 0 || setuid(uid) < 0) {
			dprintf(2, "kvmkit-init: cannot become uid %u gid %u: %s\n", uid, gid, strerror(errno));
			_exit(126);
		}
		if (chdir(cwd) < 0) {
			dprintf(2, "kvmkit-init: cannot enter %s: %s\n", cwd, strerror(errno));
			_exit(126);
		}
		if (argc == 0) {
			static char *shell[] = {"/bin/sh", "-i", NULL};
			for (int i = 0; i < envc; i++)
				if (!strncmp(envp[i], "SHELL=", 6) && envp[i][6])
					shell[0] = envp[i] + 6;
			memcpy(argv, shell, sizeof shell);
		}
		environ = envp;
		execvp(argv[0], argv);
		dprintf(2, "kvmkit-init: %s: %s\n", argv[0], strerror(errno));
		_exit(errno == ENOENT ? 127 : 126);
	}
	for (;;) {
		pid_t pid = wait(&wstatus);
		if (pid < 0 && errno == EINTR)
			continue;
		if (pid < 0)
			fail("wait: %s", strerror(errno));
		if (pid != child)
			continue;                                  /* an orphan reparented to us */
		if (WIFEXITED(wstatus))
			report("exit %d", WEXITSTATUS(wstatus));
		else if (WIFSIGNALED(wstatus))
			report("signal %d", WTERMSIG(wstatus));
		else
			continue;
		break;
	}
	finish();
	return 0;
}
