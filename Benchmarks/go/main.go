// go_pingpong: the Go contender of knet's benchmark suite, in the shape of the
// original Go knet: per connection one reader goroutine (reads into a 16 KiB
// buffer, passes a copy over a channel) and one writer goroutine (writes what
// it receives). Standard library only.
//
//	go_pingpong [--host H] server PORT THREADS
//	go_pingpong [--host H] client PORT CONNS BLOCK SECONDS THREADS
package main

import (
	"fmt"
	"net"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"
)

// readBuf is the reader's buffer size, the same as every other contender's.
const readBuf = 16384

// writeQueue bounds the messages queued between reader and writer. Small: a
// channel's buffer is allocated up front (24 bytes a slot), and the original
// knet's queue was a slice that is empty while a connection idles.
const writeQueue = 16

// counter holds one connection's totals; only its reader adds to it.
type counter struct {
	bytes    int64
	messages int64
	_        [48]byte // own cache line
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: go_pingpong [--host H] server PORT THREADS\n       go_pingpong [--host H] client PORT CONNS BLOCK SECONDS THREADS")
	os.Exit(2)
}

func positive(s string) int {
	v, err := strconv.Atoi(s)
	if err != nil || v <= 0 {
		usage()
	}
	return v
}

// raiseNoFile raises the soft open-file limit to the hard limit (Go 1.19 does not).
func raiseNoFile() {
	var rl syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl) == nil && rl.Cur < rl.Max {
		rl.Cur = rl.Max
		_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl)
	}
}

// lost counts client connections whose reader ended (peer closed, error) before the end.
var lost int64

// serve runs the reader here and the writer in a new goroutine; first, if not
// nil, is sent before any echo.
func serve(conn *net.TCPConn, c *counter, first []byte) {
	_ = conn.SetNoDelay(true)
	ch := make(chan []byte, writeQueue)
	go func() {
		for msg := range ch {
			if _, err := conn.Write(msg); err != nil {
				conn.Close()
				for range ch { // drain until the reader stops
				}
				return
			}
		}
	}()
	if first != nil {
		ch <- first
	}
	buf := make([]byte, readBuf)
	for {
		n, err := conn.Read(buf)
		if n > 0 {
			if c != nil {
				atomic.AddInt64(&c.bytes, int64(n))
				atomic.AddInt64(&c.messages, 1)
			}
			msg := make([]byte, n)
			copy(msg, buf[:n])
			ch <- msg
		}
		if err != nil {
			if c != nil {
				atomic.AddInt64(&lost, 1)
			}
			close(ch)
			conn.Close()
			return
		}
	}
}

func runServer(host string, port int) {
	ln, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(port)))
	if err != nil {
		fmt.Fprintln(os.Stderr, "listen:", err)
		os.Exit(1)
	}
	for {
		conn, err := ln.Accept()
		if err != nil {
			// EMFILE and the like: back off briefly, as net/http does.
			time.Sleep(5 * time.Millisecond)
			continue
		}
		go serve(conn.(*net.TCPConn), nil, nil)
	}
}

// totals sums every connection's counters.
func totals(counters []counter) (bytes, messages int64) {
	for i := range counters {
		bytes += atomic.LoadInt64(&counters[i].bytes)
		messages += atomic.LoadInt64(&counters[i].messages)
	}
	return bytes, messages
}

func runClient(host string, port, conns, block, seconds int) {
	first := make([]byte, block)
	for i := range first {
		first[i] = byte(i % 128)
	}
	counters := make([]counter, conns)
	addr := net.JoinHostPort(host, strconv.Itoa(port))
	for i := 0; i < conns; i++ {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			fmt.Fprintln(os.Stderr, "dial:", err)
			os.Exit(1)
		}
		go serve(conn.(*net.TCPConn), &counters[i], first)
	}
	// Count from the moment every connection is up, as the other clients do: the
	// connections dialled first have been ping-ponging meanwhile.
	bytes0, messages0 := totals(counters)
	time.Sleep(time.Duration(seconds) * time.Second)
	bytes, messages := totals(counters)
	bytes -= bytes0
	messages -= messages0
	var avg int64
	if messages > 0 {
		avg = bytes / messages
	}
	fmt.Printf("%d total bytes read\n", bytes)
	fmt.Printf("%d total messages read\n", messages)
	fmt.Printf("%d average message size\n", avg)
	fmt.Printf("%.1f MiB/s throughput\n", float64(bytes)/float64(seconds)/1048576)
	if n := atomic.LoadInt64(&lost); n > 0 {
		fmt.Fprintf(os.Stderr, "%d of %d connections closed during the run\n", n, conns)
		os.Exit(1)
	}
	os.Exit(0)
}

func main() {
	args := os.Args[1:]
	host := "127.0.0.1"
	if len(args) >= 2 && args[0] == "--host" {
		host = args[1]
		args = args[2:]
	}
	raiseNoFile()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sig
		os.Exit(0)
	}()
	switch {
	case len(args) == 3 && args[0] == "server":
		port, threads := positive(args[1]), positive(args[2])
		runtime.GOMAXPROCS(threads)
		runServer(host, port)
	case len(args) == 6 && args[0] == "client":
		port, conns, block := positive(args[1]), positive(args[2]), positive(args[3])
		seconds, threads := positive(args[4]), positive(args[5])
		runtime.GOMAXPROCS(threads)
		runClient(host, port, conns, block, seconds)
	default:
		usage()
	}
}
