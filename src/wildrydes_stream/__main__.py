from wildrydes_stream.cli import main

raise SystemExit(main())
